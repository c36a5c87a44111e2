"""FastDPOTrainer's multi-process plumbing, checked in one process: the engine's gathered metrics equal the
full-batch ones, the wrapper argument is validated, and the parallelism setups that are not supported are refused.

The 2-process runs against TRL's ``DPOTrainer`` (DDP, ZeRO-2/3, FSDP2) are in ``tests/test_trl_multiprocess.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from launch import needs_gloo

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = needs_gloo


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
    trainer = FastDPOTrainer(
        model=make_model("llama", tok),
        ref_model=make_model("llama", tok, seed=1),
        args=args,
        train_dataset=datasets.Dataset.from_list(preference_rows(4)),
        processing_class=tok,
    )
    trainer._check_parallelism()  # one process: accepted
    with monkeypatch.context() as m:  # FSDP1 (no FSDP2 plugin) is refused; DeepSpeed and FSDP2: tests/test_sharded_*
        m.setattr(trainer, "is_fsdp_enabled", True)
        with pytest.raises(NotImplementedError, match="FSDP version 1"):
            trainer._check_parallelism()

    def fake(**kw) -> SimpleNamespace:
        return SimpleNamespace(
            **{"parallelism_config": None, "num_processes": 2, "distributed_type": DistributedType.MULTI_CPU, **kw}
        )

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
