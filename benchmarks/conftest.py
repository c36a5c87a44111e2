"""Correctness rule of the pytest-benchmark suites (``pytest benchmarks/``; CI runs them with ``--benchmark-disable``):
every implementation's output and gradients are compared with a float64 recomputation, and the error may not exceed
the naive PyTorch path's error in the same dtype (``log_softmax`` of the materialized logits, all in that dtype) plus
a small tolerance -- the suite-wide rule, not a fixed atol."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def within_naive(name: str, got: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor) -> None:
    """``max|got - ref| <= max|naive - ref| + tol`` with ``tol = (2e-6 + u) * max|ref|``, where ``u`` is the unit
    roundoff (``eps / 2``) of ``got``'s dtype when it is half precision (one final rounding to the output dtype)."""
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    unit_roundoff = torch.finfo(got.dtype).eps / 2 if got.dtype in (torch.bfloat16, torch.float16) else 0.0
    ref = ref.detach().double().cpu()
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((got.detach().double().cpu() - ref).abs().max())
    naive_err = float((naive.detach().double().cpu() - ref).abs().max())
    bound = naive_err + (2e-6 + unit_roundoff) * scale
    assert err <= bound, f"{name}: error {err:.3e} > naive same-dtype error {naive_err:.3e} + tol (scale {scale:.3e})"


@pytest.fixture
def check_within_naive() -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    return within_naive
