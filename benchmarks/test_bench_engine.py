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
import torch.nn.functional as F

from fastdpo.benchmarks import engine_step

ARGS = ["--pairs", "2", "--prompt-len", "32", "--completion-len", "12", "--vocab", "1024", "--hidden", "64",
        "--layers", "2", "--heads", "4"]
BETA = 0.1


def _naive_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``[2P]`` per-sequence log-probs from the model's full logits on a ``pad`` batch (float64 sums for float64)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = torch.log_softmax(logits.flatten(0, 1), dim=-1)[batch["logp_index"], batch["logp_labels"]]
    return torch.zeros(2 * batch["num_pairs"], dtype=picked.dtype).index_add(0, batch["logp_seq"], picked)


def _sigmoid_dpo(pol: torch.Tensor, ref: torch.Tensor) -> float:
    p = pol.shape[0] // 2
    return float(-F.logsigmoid(BETA * ((pol[:p] - ref[:p]) - (pol[p:] - ref[p:]))).mean())


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
    o_pol, o_ref = (_naive_logps(copy.deepcopy(m).double(), pad_batch) for m in (policy, ref))
    n_pol, n_ref = _naive_logps(policy, pad_batch), _naive_logps(ref, pad_batch)
    engine = DPOEngine(policy, ref, reference="model", loss_type="sigmoid", beta=BETA)

    def step() -> float:
        policy.zero_grad(set_to_none=True)
        loss, _ = engine.step(batch)
        loss.backward()
        return float(loss.detach())

    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    naive_err = float((n_pol.double() - o_pol).abs().max() + (n_ref.double() - o_ref).abs().max())
    bound = 2 * BETA * naive_err + 1e-6
    assert abs(loss - _sigmoid_dpo(o_pol, o_ref)) <= bound, (loss, _sigmoid_dpo(o_pol, o_ref), bound)
    assert abs(_sigmoid_dpo(o_pol, o_ref) - _sigmoid_dpo(o_ref, o_ref)) > 10 * bound  # the policy is not the ref
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    benchmark.extra_info.update(packing=packing, pairs=args.pairs, tokens=int(batch["attention_mask"].sum()))
