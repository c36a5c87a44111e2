"""pytest-benchmark suite: one DPO engine step (reference + policy forward, sigmoid loss, backward) of
``fastdpo.DPOEngine`` on a tiny Llama, for each packing, on a prompt-heavy batch. Run with ``pytest benchmarks/``.

The batch and models come from :mod:`fastdpo.benchmarks.engine_step` (same tiny Llama and rows as that benchmark).
Each case checks that the loss is finite and that the packings agree on it (the same pairs, the same math).
"""
from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import engine_step

ARGS = ["--pairs", "2", "--prompt-len", "32", "--completion-len", "12", "--vocab", "1024", "--hidden", "64",
        "--layers", "2", "--heads", "4"]
_LOSSES: dict[str, float] = {}


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_bench_engine_step(benchmark, packing):
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

    args = engine_step.build_parser().parse_args(ARGS)
    policy, ref = engine_step.make_models(args)
    tok = engine_step.make_tokenizer(args.vocab)
    batch = PreferenceCollator(tok, packing=packing)(engine_step.make_rows(args))
    engine = DPOEngine(policy, ref, reference="model", loss_type="sigmoid", beta=0.1)

    def step() -> float:
        policy.zero_grad(set_to_none=True)
        loss, _ = engine.step(batch)
        loss.backward()
        return float(loss.detach())

    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters() if p.requires_grad)
    _LOSSES[packing] = loss
    for other in _LOSSES.values():
        assert loss == pytest.approx(other, rel=1e-4, abs=1e-5)
    benchmark.extra_info.update(packing=packing, pairs=args.pairs, tokens=int(batch["attention_mask"].sum()))
