"""FastDPOTrainer under accelerate data parallelism: 2 processes, gloo, ``DistributedType.MULTI_CPU``.

One ``torch.distributed.run`` launch of ``tests/trl_dist_worker.py`` (2 ranks, module-scoped) trains TRL 1.16's
``DPOTrainer`` and ``FastDPOTrainer`` 3 steps each on the same sharded data, for a separate reference model (plus an
``evaluate()``), a LoRA policy (adapter-disabled reference), precomputed reference log-probs and gradient
accumulation. The tests check that
the run really was 2-process DDP (each rank saw its own batches, ``compute_loss`` got the DDP wrapper), that
FastDPOTrainer's loss, grad norm and every metric TRL logs (gathered over the ranks) equal TRL's, and that the
parameters are identical on both ranks and equal TRL's -- which only holds when the gradients were averaged over the
ranks (each rank trains on different pairs). Single-process checks: the engine's gathered metrics equal the full-batch
ones, the wrapper argument is validated, and the parallelism setups that are not supported are refused.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("trl_dist_worker.py")
WORLD = 2
TIMEOUT_S = 300
CASES = ("ref_model", "lora", "precompute", "grad_accum")
_SKIP = {"epoch", "step", "learning_rate"}  # as tests/test_trl.py
REL, ABS = 2e-4, 2e-5  # the tolerances of tests/test_trl.py


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    """Both ranks' result dicts (rank order) of one 2-process launch covering every case."""
    out = tmp_path_factory.mktemp("trl_dist")
    data, eval_data = out / "train.jsonl", out / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(12, seed=3)))
    # 5 eval rows over 2 ranks x 2: the last global batch is padded with repeated rows (accelerate's even_batches)
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(5, seed=11)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(WORKER),
           f"--data={data}", f"--eval-data={eval_data}", f"--out={out}", f"--cases={','.join(CASES)}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    with open(out / "launch.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the 2 ranks it started (own session)
            proc.wait()
            code = None
        log.seek(0)
        output = log.read()[-8000:]
    assert code is not None, f"the 2-rank run did not finish within {TIMEOUT_S}s:\n{output}"
    assert code == 0, f"the 2-rank run failed (exit code {code}):\n{output}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_logs(fast: list[dict], ref: list[dict]) -> None:
    assert len(ref) == 3 and len(fast) == 3, (len(fast), len(ref))
    for step, (f, r) in enumerate(zip(fast, ref), start=1):
        expected = {k for k in r if k not in _SKIP}
        assert {"loss", "grad_norm", "rewards/margins", "entropy", "num_tokens"} <= expected, sorted(expected)
        assert expected <= set(f), f"step {step}: FastDPOTrainer did not log {sorted(expected - set(f))}"
        for key in sorted(expected):
            assert math.isfinite(f[key]), (step, key, f[key])
            assert f[key] == pytest.approx(r[key], rel=REL, abs=ABS), f"step {step} {key}: {f[key]} vs TRL {r[key]}"


@pytest.mark.parametrize("case", CASES)
def test_fast_trainer_matches_trl_with_two_processes(results, case):
    per_rank = [res[case] for res in results]
    for rank, res in enumerate(per_rank):
        for name in ("trl", "fast"):
            run = res[name]
            assert run["num_processes"] == WORLD and run["process_index"] == rank, (name, rank)
            assert run["distributed_type"] == "DistributedType.MULTI_CPU", (name, run["distributed_type"])
            # every training step ran through the DDP wrapper accelerate prepared
            assert run["wrapped"] == ["DistributedDataParallel"], (name, run["wrapped"])
    # the ranks trained on different pairs (so identical parameters below need the gradient all-reduce) ...
    for name in ("trl", "fast"):
        a, b = per_rank[0][name]["local_input_sums"], per_rank[1][name]["local_input_sums"]
        assert len(a) == 3 * (2 if case == "grad_accum" else 1) and all(x != y for x, y in zip(a, b)), (name, a, b)
    assert per_rank[0]["fast"]["local_input_sums"] == per_rank[0]["trl"]["local_input_sums"]  # same shards as TRL

    ref_steps = per_rank[0]["trl"]["steps"]
    assert len({round(s["loss"], 7) for s in ref_steps}) > 1  # training moves: the comparison can fail
    for rank, res in enumerate(per_rank):
        _assert_same_logs(res["fast"]["steps"], ref_steps)
        # metrics are global (gathered), so every rank logs the same values
        assert res["fast"]["steps"] == per_rank[0]["fast"]["steps"], f"rank {rank} logged other metrics"

    # ... and ended with the same parameters, equal to TRL's (which averages gradients over the ranks)
    fast0, fast1, trl0 = (per_rank[0]["fast"]["params"], per_rank[1]["fast"]["params"],
                          per_rank[0]["trl"]["params"])
    assert set(fast0) == set(trl0) and len(fast0) > 0
    for name, p in trl0.items():
        assert torch.equal(fast0[name], fast1[name]), f"parameter {name} differs between ranks"
        assert torch.equal(p, per_rank[1]["trl"]["params"][name]), f"TRL's {name} differs between ranks"
        torch.testing.assert_close(fast0[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if case == "lora":  # LoRA B starts at 0: the adapter must have moved
        assert max(float(p.abs().max()) for n, p in trl0.items() if "lora_B" in n) > 0.0

    if case == "ref_model":
        ref_eval, fast_eval = per_rank[0]["trl"]["eval"], per_rank[0]["fast"]["eval"]
        keys = [k for k in ref_eval if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
        assert "eval_rewards/margins" in keys and "eval_entropy" in keys, keys
        for key in keys:
            assert fast_eval[key] == pytest.approx(ref_eval[key], rel=REL, abs=ABS), (key, fast_eval[key],
                                                                                     ref_eval[key])
            assert per_rank[1]["fast"]["eval"][key] == fast_eval[key], f"rank 1 evaluated {key} differently"


# ------------------------------------------------------------------------------------------------ single process
def test_engine_gathered_metrics_equal_full_batch():
    """Two simulated ranks in one process: rank 0's ``gather`` returns its tensor concatenated with what rank 1 passed
    to the same call. The gathered metrics must equal the metrics of one step on both halves together."""
    from fastdpo import DPOEngine, PreferenceCollator

    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=0)
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    engine = DPOEngine(policy, ref, beta=0.5)
    collate = PreferenceCollator(tok, packing="padding_free")
    rows = preference_rows(6, seed=5)
    with torch.no_grad():
        _, full = engine.step(collate(rows))
        sent: list[torch.Tensor] = []

        def record(t: torch.Tensor) -> torch.Tensor:
            sent.append(t)
            return t

        _, rank1 = engine.step(collate(rows[3:]), gather=record)
        _, rank0 = engine.step(collate(rows[:3]), gather=lambda t: torch.cat([t, sent.pop(0)]))
        _, local0 = engine.step(collate(rows[:3]))
    assert not sent, "rank 0 made fewer gather calls than rank 1"
    assert set(rank0) == set(full) and {"entropy", "logits/chosen", "rewards/margins"} <= set(full)
    for key, value in full.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    # the check can fail: one rank's own metrics differ from the full batch's
    assert any(not torch.allclose(local0[k], full[k], rtol=1e-4) for k in full)
    assert any(not torch.allclose(rank1[k], full[k], rtol=1e-4) for k in full)


def test_engine_step_model_must_wrap_the_policy():
    from fastdpo import DPOEngine, PreferenceCollator

    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=0)
    engine = DPOEngine(policy, make_model("llama", tok, seed=1), beta=0.5)
    batch = PreferenceCollator(tok)(preference_rows(2))
    loss, _ = engine.step(batch, policy)
    torch.testing.assert_close(loss, engine.step(batch)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="wrapper of it"):
        engine.step(batch, make_model("llama", tok, seed=2))
    with pytest.raises(TypeError, match="nn.Module"):
        engine.step(batch, "policy")


def test_unsupported_parallelism_is_refused(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer

    tok = make_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, bf16=False)
    trainer = FastDPOTrainer(model=make_model("llama", tok), ref_model=make_model("llama", tok, seed=1), args=args,
                             train_dataset=datasets.Dataset.from_list(preference_rows(4)), processing_class=tok)
    trainer._check_parallelism()  # one process: accepted
    with monkeypatch.context() as m:  # FSDP1 (no FSDP2 plugin) is refused; DeepSpeed and FSDP2: tests/test_sharded_*
        m.setattr(trainer, "is_fsdp_enabled", True)
        with pytest.raises(NotImplementedError, match="FSDP version 1"):
            trainer._check_parallelism()

    def fake(**kw) -> SimpleNamespace:
        return SimpleNamespace(**{"parallelism_config": None, "num_processes": 2,
                                  "distributed_type": DistributedType.MULTI_CPU, **kw})

    monkeypatch.setattr(trainer, "accelerator", fake())
    trainer._check_parallelism()  # DDP on CPU: supported
    monkeypatch.setattr(trainer, "accelerator", fake(distributed_type=DistributedType.XLA))
    with pytest.raises(NotImplementedError, match="XLA"):
        trainer._check_parallelism()
    monkeypatch.setattr(trainer, "accelerator", fake(parallelism_config=SimpleNamespace(tp_size=2, cp_size=1)))
    with pytest.raises(NotImplementedError, match="tp"):
        trainer._check_parallelism()
    monkeypatch.setattr(trainer, "accelerator", fake())
    monkeypatch.setattr(trainer.args, "torch_compile", True)
    with pytest.raises(NotImplementedError, match="torch_compile"):
        trainer._check_parallelism()
