"""Helpers several test files share (``from helpers import ...``; tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from fastdpo.memory import StepConfig

#: every optional token statistic of the fused head (``linear_token_logprobs`` and its naive oracle)
STAT_FLAGS: dict[str, bool] = {
    "return_entropy": True,
    "return_log_sum_p2": True,
    "return_mean_logit": True,
    "return_argmax_hit": True,
}

#: the per-step metrics TRL 1.16's ``DPOTrainer`` logs for a sigmoid-loss step besides ``loss`` and ``num_tokens``
#: (written out here, independently of :mod:`fastdpo.losses.metrics`)
TRL_STEP_METRICS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)

#: TRL ``DPOConfig`` arguments of the tiny offline training runs: CPU, fp32, plain SGD at a constant rate, a log entry
#: every step, nothing saved or reported
TINY_DPO_ARGS: dict[str, Any] = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    logging_steps=1,
    optim="sgd",
    learning_rate=0.02,
    lr_scheduler_type="constant",
    seed=0,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    bf16=False,
    fp16=False,
    dataloader_num_workers=0,
    beta=0.5,
)


def dpo_config(output_dir: Path | str, **overrides: Any) -> Any:
    """TRL's ``DPOConfig`` of :data:`TINY_DPO_ARGS` writing to ``output_dir``, with ``overrides`` on top."""
    from trl import DPOConfig

    return DPOConfig(output_dir=str(output_dir), **{**TINY_DPO_ARGS, **overrides})


def scaled_llama() -> dict[str, Any]:
    """Llama-3.2-1B scaled down so that ``memory --measure`` of one step takes a few hundred MiB on CPU: 2 layers,
    hidden 256, 4 heads (2 KV), vocabulary 32000."""
    from fastdpo import memory as M

    return dict(
        M.PRESETS["Llama-3.2-1B"],
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
    )


def measure_matches_estimate(step: StepConfig, variants: list[str], rel: float) -> dict[str, dict[str, Any]]:
    """Measure ``variants`` of ``step`` on :func:`scaled_llama` (each in its own process) and assert that every one
    ran and that its peak RSS over the baseline is within ``rel`` of :func:`fastdpo.memory.estimate`'s peak; the
    measurements by variant."""
    from fastdpo import memory as M
    from fastdpo.benchmarks.memory_measure import measure

    cfg = scaled_llama()
    measured = measure(cfg, step, variants, None)
    shape = M.shape_from_config(cfg)
    for v in variants:
        assert "error" not in measured[v], measured[v]
        assert M.estimate(shape, step, v)["peak"] == pytest.approx(measured[v]["peak"], rel=rel), v
    return measured


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while ``fn`` runs, excluding the storages whose ``data_ptr`` is in
    ``exclude`` (parameters, inputs)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in exclude)


def perturbed_reference(policy: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A frozen reference model near ``policy``: a deep copy in eval mode, each parameter plus ``0.02 * N(0, 1)`` noise
    drawn from a generator seeded with ``seed`` (so the DPO rewards are not all zero)."""
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return ref.eval().requires_grad_(False)


def metrics_records(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``fastdpo train``'s ``metrics.jsonl`` in ``out_dir``, one dict a line."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
