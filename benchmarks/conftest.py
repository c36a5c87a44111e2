"""Correctness rule of the pytest-benchmark suites (``pytest benchmarks/``; CI runs them with ``--benchmark-disable``):
every implementation's output and gradients are compared with a float64 recomputation, and the error may not exceed
the naive PyTorch path's error in the same dtype (``log_softmax`` of the materialized logits, all in that dtype) plus
a small tolerance -- the suite-wide rule, not a fixed atol (:func:`fastdpo.reference.assert_within_naive`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.reference import assert_within_naive


def run_case(
    benchmark: Any, workload: str, name: str, shape: impls.Shape, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[impls.Impl, impls.Problem, torch.Tensor]:
    """``(impl, problem, output)`` of implementation ``name`` of ``workload`` benchmarked forward + backward (3 rounds
    after 1 warm-up, gradients reset each round; ``problem.upstream`` is the output's gradient, ``None`` for a scalar
    loss); the test is skipped when the implementation is unavailable on ``device``."""
    impl = impls.get_impl(workload, name)
    reason = impl.unavailable(device)
    if reason is not None:
        pytest.skip(reason)
    problem = impls.make_problem(workload, shape, dtype, device, seed=seed)
    fn = impl.build(problem, device)

    def step() -> torch.Tensor:
        for t in problem.leaves:
            t.grad = None
        out = fn()
        out.backward(problem.upstream)
        return out

    return impl, problem, benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture
def bench_case(benchmark: Any) -> Callable[..., tuple[impls.Impl, impls.Problem, torch.Tensor]]:
    """:func:`run_case` bound to the test's ``benchmark`` fixture."""
    return lambda *args, **kwargs: run_case(benchmark, *args, **kwargs)


@pytest.fixture
def check_within_naive() -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    return assert_within_naive
