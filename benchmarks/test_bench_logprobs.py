"""pytest-benchmark suite: per-sequence log-probs from logits (the log-prob kernel, forward + backward) against naive
PyTorch and TRL's selective_log_softmax, on small CPU shapes. Run with ``pytest benchmarks/``.

Each case also checks the result and the logits gradient against a float64 recomputation, within the naive
same-dtype error (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.benchmarks.impls import Shape
from fastdpo.reference import naive_sequence_logprobs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(512, 0, 4093) if DEVICE.type == "cpu" else Shape(16384, 0, 128256)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def _plain(problem: impls.Problem, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum of ``log_softmax(logits)[labels]`` with ``log_softmax`` in ``dtype`` (float64: the oracle), summed in
    fp32 (float64): ``(sequence log-probs, logits grad)`` for the problem's upstream gradient."""
    logits = problem.inputs["logits"].detach().to(dtype).requires_grad_(True)
    labels = problem.inputs["labels"]
    out = naive_sequence_logprobs(logits, labels)
    out.backward(problem.upstream.to(out.dtype))
    return out.detach(), logits.grad


@pytest.mark.parametrize("name", impls.impl_names("logprobs"))
def test_bench_sequence_logprobs_fwd_bwd(benchmark, bench_case, check_within_naive, name):
    shape = SHAPE.normalized("logprobs")
    impl, problem, out = bench_case("logprobs", name, shape, DTYPE, DEVICE, seed=7)
    (naive, naive_grad), (ref, ref_grad) = _plain(problem, DTYPE), _plain(problem, torch.float64)
    check_within_naive(f"{name} log-probs", out, naive, ref)
    check_within_naive(f"{name} logits.grad", problem.leaves[0].grad, naive_grad, ref_grad)
    benchmark.extra_info.update(tokens=shape.tokens, vocab=shape.vocab, impl=impl.label(DEVICE))
