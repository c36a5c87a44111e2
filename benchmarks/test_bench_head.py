"""pytest-benchmark suite: the fused LM head (per-token log-probs of hidden @ W.T, forward + backward) against naive
PyTorch, TRL 1.16's ChunkedLogProbFunction and torch's chunked linear_cross_entropy, on small CPU shapes.

Run with ``pytest benchmarks/`` (``--benchmark-disable`` to only check). Each case also checks the log-probs against a
float64 recomputation, so the suite fails when an implementation is wrong, not only when it is slow.
"""
from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.benchmarks.impls import Shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(256, 64, 4093) if DEVICE.type == "cpu" else Shape(4096, 2048, 128256)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("name", impls.impl_names("head"))
def test_bench_head_fwd_bwd(benchmark, name):
    impl = impls.get_impl("head", name)
    reason = impl.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    problem = impls.make_problem("head", SHAPE, DTYPE, DEVICE, seed=5)
    fn = impl.build(problem, DEVICE)

    def step() -> torch.Tensor:
        for t in problem.leaves:
            t.grad = None
        out = fn()
        out.backward(problem.upstream)
        return out

    out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    x = problem.inputs
    ref = torch.log_softmax(x["hidden"].detach().double() @ x["weight"].detach().double().T, -1)
    ref = ref.gather(-1, x["labels"][:, None])[:, 0]
    tol = 1e-3 if DTYPE == torch.float32 else 0.5
    torch.testing.assert_close(out.detach().double(), ref, rtol=0, atol=tol)
    assert all(torch.isfinite(t.grad).all() for t in problem.leaves)
    benchmark.extra_info.update(tokens=SHAPE.tokens, hidden=SHAPE.hidden, vocab=SHAPE.vocab, impl=impl.label(DEVICE))
