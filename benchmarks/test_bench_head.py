"""pytest-benchmark suite: the fused LM head (per-token log-probs of hidden @ W.T, forward + backward) against naive
PyTorch, TRL 1.16's ChunkedLogProbFunction and torch's chunked linear_cross_entropy, on small CPU shapes.

Run with ``pytest benchmarks/`` (``--benchmark-disable`` to only check, as CI does). Each case also checks the
log-probs and both gradients against a float64 recomputation within the naive same-dtype error (``conftest.py``), so
the suite fails when an implementation is wrong, not only when it is slow.
"""

from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.benchmarks.impls import Shape
from fastdpo.reference import naive_token_logprobs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(256, 64, 4093) if DEVICE.type == "cpu" else Shape(4096, 2048, 128256)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def _plain(problem: impls.Problem, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log_softmax(hidden @ weight.T)[labels]`` entirely in ``dtype`` (the naive path, or float64 as the oracle):
    ``(log-probs, hidden grad, weight grad)`` for the problem's upstream gradient."""
    x = problem.inputs
    h = x["hidden"].detach().to(dtype).requires_grad_(True)
    w = x["weight"].detach().to(dtype).requires_grad_(True)
    out = naive_token_logprobs(h @ w.T, x["labels"])
    out.backward(problem.upstream.to(dtype))
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("name", impls.impl_names("head"))
def test_bench_head_fwd_bwd(benchmark, bench_case, check_within_naive, name):
    impl, problem, out = bench_case("head", name, SHAPE, DTYPE, DEVICE, seed=5)
    hidden, weight = problem.leaves
    naive, ref = _plain(problem, DTYPE), _plain(problem, torch.float64)
    for label, got, n, r in zip(
        ("log-probs", "hidden.grad", "weight.grad"), (out, hidden.grad, weight.grad), naive, ref
    ):
        check_within_naive(f"{name} {label}", got, n, r)
    benchmark.extra_info.update(tokens=SHAPE.tokens, hidden=SHAPE.hidden, vocab=SHAPE.vocab, impl=impl.label(DEVICE))
