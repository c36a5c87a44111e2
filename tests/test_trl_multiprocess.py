"""FastDPOTrainer against TRL 1.16's DPOTrainer under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU processes.

Four launches of ``tests/trl_multiprocess_worker.py`` (module-scoped fixtures, one per setup, every case inside):

* DDP (accelerate's ``MULTI_CPU`` data parallelism, gloo) under ``torchrun``;
* ZeRO-3 through ``accelerate launch --config_file`` (TRL's ``zero3.yaml`` on 2 CPU processes: ``zero3_init_flag``,
  ``zero3_save_16bit_model``; DeepSpeed's CPU accelerator, gloo);
* ZeRO-2 (and one ZeRO-1 case) through ``DPOConfig(deepspeed={...})`` under ``torchrun``;
* FSDP2 through ``DPOConfig(fsdp=..., fsdp_config={"version": 2})`` under ``torchrun``, with accelerate's FSDP2
  path turned on for CPU processes (accelerate itself runs an FSDP config as DDP on CPU; see the worker).

Each trains both trainers 4 optimizer steps on the same shards (a separate reference model + ``evaluate()`` +
``save_model``; LoRA without a reference model; ``precompute_ref_log_probs`` without a reference model; gradient
accumulation) and the tests check that the run really was distributed as configured (each rank trained on its own
shard, so equal parameters on both ranks need the gradient reduction), that FastDPOTrainer logs every
metric TRL logs with loss, grad norm and metrics within rel 1e-4, that the parameters after training match TRL's
and agree across ranks, that the saved model reloads with ``AutoModelForCausalLM.from_pretrained``, that the
reference cache was written once, and (ZeRO-3) that ``resume_from_checkpoint`` continues exactly as the
uninterrupted run without recomputing the reference log-probs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")
datasets = pytest.importorskip("datasets")

from launch import MULTI_PROCESS, run_launcher, torchrun  # tests/ is on sys.path (conftest.py)

from fastdpo.tiny import preference_rows

pytestmark = MULTI_PROCESS

WORKER = Path(__file__).with_name("trl_multiprocess_worker.py")
WORLD = 2
TIMEOUT_S = 420
STEPS = 4
CASES = ("ref_model", "lora", "precompute", "grad_accum")
# The tolerance is rel 1e-4. ABS covers values near 0: the rewards are beta * (differences of log-probs of
# magnitude ~100), whose fp32 rounding alone is ~1e-5 (two fused heads summing in different orders).
REL, ABS = 1e-4, 1e-5
_SKIP = {"epoch", "step", "learning_rate"}

ZERO3_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


def _launch(out: Path, setup: str, cases: tuple[str, ...]) -> list[dict[str, Any]]:
    data, eval_data = out / "train.jsonl", out / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(16, seed=3)))
    # 5 eval rows over 2 ranks x 2: the last global batch is padded with repeated rows (accelerate's even_batches)
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(5, seed=11)))
    worker_args = [
        str(WORKER),
        f"--setup={setup}",
        f"--data={data}",
        f"--eval-data={eval_data}",
        f"--out={out}",
        f"--cases={','.join(cases)}",
    ]
    if setup == "zero3":
        config = out / "zero3.yaml"
        config.write_text(ZERO3_ACCELERATE_CONFIG)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *worker_args]
    else:
        cmd = torchrun(WORLD, *worker_args)
    return run_launcher(cmd, out, WORLD, TIMEOUT_S, what=f"{setup} run")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", CASES)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("zero3"), "zero3", (*CASES, "resume"))


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("zero2"), "zero2", (*CASES, "zero1"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch(tmp_path_factory.mktemp("fsdp2"), "fsdp2", CASES)


def _assert_same_logs(fast: list[dict], ref: list[dict], what: str) -> None:
    assert len(ref) == STEPS and len(fast) == STEPS, (what, len(fast), len(ref))
    for step, (f, r) in enumerate(zip(fast, ref), start=1):
        expected = {k for k in r if k not in _SKIP}
        assert {"loss", "grad_norm", "rewards/margins", "entropy", "num_tokens", "logps/chosen"} <= expected
        assert expected <= set(f), f"{what} step {step}: FastDPOTrainer did not log {sorted(expected - set(f))}"
        for key in sorted(expected):
            assert math.isfinite(f[key]), (what, step, key, f[key])
            assert f[key] == pytest.approx(r[key], rel=REL, abs=ABS), (
                f"{what} step {step} {key}: {f[key]} vs TRL {r[key]}"
            )


def _check_setup(per_rank: list[dict[str, Any]], setup: str, case: str) -> None:
    for rank, res in enumerate(per_rank):
        for name in ("trl", "fast"):
            run = res[name]
            assert run["num_processes"] == WORLD and run["process_index"] == rank, (setup, name, rank)
            if setup == "ddp":
                assert run["distributed_type"] == "DistributedType.MULTI_CPU", (name, run["distributed_type"])
                assert run["wrapped"] == ["DistributedDataParallel"], (name, run["wrapped"])
            elif setup.startswith("zero"):
                assert run["distributed_type"] == "DistributedType.DEEPSPEED", (name, run["distributed_type"])
                assert run["zero_stage"] == (1 if case == "zero1" else int(setup[-1])), (name, run["zero_stage"])
                assert run["wrapped"] == ["DeepSpeedEngine"], (name, run["wrapped"])
            else:
                assert run["distributed_type"] == "DistributedType.FSDP", (name, run["distributed_type"])
                assert run["fsdp_version"] == 2, (name, run["fsdp_version"])
                # the model compute_loss received is the one accelerate sharded in place (FSDP2 class prefix)
                assert len(run["wrapped"]) == 1 and run["wrapped"][0].startswith("FSDP"), (name, run["wrapped"])
    for name in ("trl", "fast"):  # each rank trained on its own shard of every global batch
        a, b = per_rank[0][name]["local_input_sums"], per_rank[1][name]["local_input_sums"]
        assert len(a) == STEPS * (2 if case == "grad_accum" else 1) and all(x != y for x, y in zip(a, b)), (name, a, b)
    assert per_rank[0]["fast"]["local_input_sums"] == per_rank[0]["trl"]["local_input_sums"]


def _check_against_trl(per_rank: list[dict[str, Any]], setup: str, case: str) -> None:
    _check_setup(per_rank, setup, case)
    ref_steps = per_rank[0]["trl"]["steps"]
    assert len({round(s["loss"], 6) for s in ref_steps}) > 1  # training moves: the comparison can fail
    for rank, res in enumerate(per_rank):
        _assert_same_logs(res["fast"]["steps"], ref_steps, f"{setup}/{case} rank {rank}")
        assert res["fast"]["steps"] == per_rank[0]["fast"]["steps"], f"rank {rank} logged other metrics"
    fast0, fast1, trl0 = per_rank[0]["fast"]["params"], per_rank[1]["fast"]["params"], per_rank[0]["trl"]["params"]
    assert set(fast0) == set(trl0) and len(fast0) > 0
    for name, p in trl0.items():
        assert torch.equal(fast0[name], fast1[name]), f"{setup}/{case}: {name} differs between ranks"
        torch.testing.assert_close(fast0[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if case == "lora":  # LoRA B starts at 0: the adapter must have moved
        assert max(float(p.abs().max()) for n, p in trl0.items() if "lora_B" in n) > 0.0
    if case == "ref_model":
        ref_eval, fast_eval = per_rank[0]["trl"]["eval"], per_rank[0]["fast"]["eval"]
        keys = [k for k in ref_eval if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
        assert "eval_rewards/margins" in keys and "eval_entropy" in keys, keys
        for key in keys:
            assert fast_eval[key] == pytest.approx(ref_eval[key], rel=REL, abs=ABS), (
                key,
                fast_eval[key],
                ref_eval[key],
            )
            assert per_rank[1]["fast"]["eval"][key] == fast_eval[key], f"rank 1 evaluated {key} differently"
        _check_reload(per_rank[0]["fast"])
    if case == "precompute":
        for res in per_rank:  # one cache file, written once by rank 0, the same on every rank's view
            files = res["fast"]["ref_cache_files"]
            assert len(files) == 1 and files[0].startswith("train-") and files[0].endswith(".pt"), files
            assert res["fast"]["ref_forwards"] == 16 // (2 * WORLD), res["fast"]["ref_forwards"]  # its own shard


def _check_reload(run: dict[str, Any]) -> None:
    """The folder ``save_model`` wrote reloads with ``AutoModelForCausalLM.from_pretrained`` (this process: no
    DeepSpeed, no process group) to the trained parameters."""
    from transformers import AutoModelForCausalLM

    assert run["saved_model"] is not None
    model = AutoModelForCausalLM.from_pretrained(run["saved_model"], dtype=torch.float32)
    loaded = dict(model.named_parameters())
    for name, p in run["params"].items():
        torch.testing.assert_close(loaded[name], p, rtol=0, atol=0, msg=lambda m, n=name: f"reloaded {n}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setup", ["ddp", "zero3", "zero2", "fsdp2"])  # the module-scoped launch fixtures
def test_setup_matches_trl(setup, case, request):
    _check_against_trl([r[case] for r in request.getfixturevalue(setup)], setup, case)


def test_zero1_matches_trl(zero2):
    _check_against_trl([r["zero1"] for r in zero2], "zero2", "zero1")


def test_zero3_resume_continues_exactly(zero3):
    """``train(resume_from_checkpoint=checkpoint-2)`` in a new trainer (a fresh model and DPOConfig, as a new run of
    the script): the same 4 logged steps and the same final parameters, bit for bit, as the uninterrupted run; the
    reference cache is read back, not recomputed."""
    for rank, res in enumerate(r["resume"]["fast"] for r in zero3):
        assert res["zero_stage"] == 3 and res["wrapped"] == ["DeepSpeedEngine"]
        assert [s["step"] for s in res["steps"]] == [1, 2, 3, 4]
        # num_tokens is TRL's running token total, which TRL keeps in the trainer object (not in checkpoints): a
        # resumed DPOTrainer counts again from 0, and so does FastDPOTrainer; every other entry is the same, bitwise
        before, after = res["uninterrupted_steps"], res["steps"]
        strip = [{k: v for k, v in s.items() if k != "num_tokens"} for s in (*before, *after)]
        assert strip[STEPS:] == strip[:STEPS], f"rank {rank}: resumed logs differ"
        assert [s["num_tokens"] for s in after[:2]] == [s["num_tokens"] for s in before[:2]]
        assert [s["num_tokens"] for s in after[2:]] == [s["num_tokens"] - before[1]["num_tokens"] for s in before[2:]]
        assert len({s["loss"] for s in res["steps"]}) == STEPS
        assert set(res["params"]) == set(res["uninterrupted_params"])
        for name, p in res["uninterrupted_params"].items():
            assert torch.equal(res["params"][name], p), f"rank {rank}: {name} differs after resuming"
        assert res["resume_ref_forwards"] == 0, "the resumed run recomputed the reference log-probs"
        assert len(res["ref_cache_files"]) == 1, res["ref_cache_files"]
        # the resumed run trained only the 2 remaining steps
        assert len(res["local_input_sums"]) == 2, res["local_input_sums"]
