"""pytest-benchmark suite: one DPO engine step (reference + policy forward, sigmoid loss, backward) of
``fastdpo.DPOEngine`` on a tiny Llama, for each packing, on a prompt-heavy batch. Run with ``pytest benchmarks/``.

The batch and models come from :mod:`fastdpo.benchmarks.engine_step` (same tiny Llama and rows as that benchmark).
Each case checks its loss against a float64 oracle of its own (each sequence's log-prob from the float64 models' full
logits, the sigmoid formula of LOSSES.md), within the first-order propagation of the naive fp32 path's log-prob error,
and the gradients are finite -- so every packing is checked independently, in any order or process.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastdpo.benchmarks import engine_step
from fastdpo.reference import naive_batch_logps, naive_dpo_loss

ARGS = [
    "--pairs",
    "2",
    "--prompt-len",
    "32",
    "--completion-len",
    "12",
    "--vocab",
    "1024",
    "--hidden",
    "64",
    "--layers",
    "2",
    "--heads",
    "4",
]
BETA = 0.1


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_bench_engine_step(benchmark, packing):
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

    args = engine_step.build_parser().parse_args(ARGS)
    policy, ref = engine_step.make_models(args)
    tok = engine_step.make_tokenizer(args.vocab)
    rows = engine_step.make_rows(args)
    batch = PreferenceCollator(tok, packing=packing)(rows)
    pad_batch = PreferenceCollator(tok, packing="pad")(rows)
    with torch.no_grad():
        o_pol, o_ref = (naive_batch_logps(copy.deepcopy(m).double(), pad_batch) for m in (policy, ref))
        n_pol, n_ref = naive_batch_logps(policy, pad_batch), naive_batch_logps(ref, pad_batch)
    engine = DPOEngine(policy, ref, reference="model", loss_type="sigmoid", beta=BETA)

    def step() -> float:
        policy.zero_grad(set_to_none=True)
        loss, _ = engine.step(batch)
        loss.backward()
        return float(loss.detach())

    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    naive_err = float((n_pol.double() - o_pol).abs().max() + (n_ref.double() - o_ref).abs().max())
    bound = 2 * BETA * naive_err + 1e-6
    oracle = float(naive_dpo_loss(o_pol, o_ref, BETA))
    assert abs(loss - oracle) <= bound, (loss, oracle, bound)
    assert abs(oracle - float(naive_dpo_loss(o_ref, o_ref, BETA))) > 10 * bound  # the policy is not the ref
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    benchmark.extra_info.update(packing=packing, pairs=args.pairs, tokens=int(batch["attention_mask"].sum()))
