"""pytest-benchmark suite: per-sequence log-probs from logits (the log-prob kernel, forward + backward) against naive
PyTorch and TRL's selective_log_softmax, on small CPU shapes. Run with ``pytest benchmarks/``.

Each case also checks the result against a float64 recomputation.
"""
from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.benchmarks.impls import Shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(512, 0, 4093) if DEVICE.type == "cpu" else Shape(16384, 0, 128256)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("name", impls.impl_names("logprobs"))
def test_bench_sequence_logprobs_fwd_bwd(benchmark, name):
    impl = impls.get_impl("logprobs", name)
    reason = impl.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    shape = SHAPE.normalized("logprobs")
    problem = impls.make_problem("logprobs", shape, DTYPE, DEVICE, seed=7)
    fn = impl.build(problem, DEVICE)

    def step() -> torch.Tensor:
        for t in problem.leaves:
            t.grad = None
        out = fn()
        out.backward(problem.upstream)
        return out

    out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    logits, labels = problem.inputs["logits"].detach().double(), problem.inputs["labels"]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(labels != -100, lp, 0).sum(-1)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-2 if DTYPE == torch.float32 else 2.0)
    assert torch.isfinite(problem.leaves[0].grad).all()
    benchmark.extra_info.update(tokens=shape.tokens, vocab=shape.vocab, impl=impl.label(DEVICE))
