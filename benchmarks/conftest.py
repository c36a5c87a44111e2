"""Correctness rule of the pytest-benchmark suites (``pytest benchmarks/``; CI runs them with ``--benchmark-disable``):
every implementation's output and gradients are compared with a float64 recomputation, and the error may not exceed
the naive PyTorch path's error in the same dtype (``log_softmax`` of the materialized logits, all in that dtype) plus
a small tolerance -- the suite-wide rule, not a fixed atol (:func:`fastdpo.reference.assert_within_naive`)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastdpo.reference import assert_within_naive


@pytest.fixture
def check_within_naive() -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    return assert_within_naive
