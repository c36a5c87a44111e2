"""The correctness column of the one-shot GPU run: the test suite's rule, applied to a slice of each GPU result.

For every quantity (an output, each gradient) on a slice of the case (a few rows): the largest absolute error of the
result against a float64 reference must not exceed the largest absolute error of the naive PyTorch path in the same
dtype, plus a small tolerance::

    max|result - ref| <= max|naive - ref| + rel_tol * scale        scale = max(1, max|ref|) unless given

The tolerances are the suite's (``tests/test_logprobs.py``, ``tests/test_linear_logprobs.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

# log-probs from logits: outputs and gradients (tests/test_logprobs.py)
LOGPROBS_REL_TOL = 2e-6
# fused head and model log-probs, by dtype (tests/test_linear_logprobs.py)
HEAD_REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def interpreter_bf16_slack(dtype: torch.dtype, gmax: float) -> float:
    """Half a bf16 ulp of the gradient scale when the Triton *interpreter* runs the kernels (``--dry-run``): it
    truncates fp32 -> bf16 stores where a GPU rounds to nearest even (the suite allows the same)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return gmax * 2.0**-8
    return 0.0


@dataclass(frozen=True)
class Check:
    quantity: str
    err: float
    naive_err: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.err == self.err and self.err <= self.naive_err + self.tol  # NaN never passes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass": self.passed}


def max_abs_err(result: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |result - ref|`` in float64 on the CPU (0 for empty slices); NaN anywhere gives NaN."""
    if result.shape != ref.shape:
        raise ValueError(f"result shape {list(result.shape)} != reference shape {list(ref.shape)}")
    if result.numel() == 0:
        return 0.0
    diff = (result.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs()
    return float("nan") if torch.isnan(diff).any() else diff.max().item()


def check(
    quantity: str,
    result: torch.Tensor,
    naive: torch.Tensor,
    ref: torch.Tensor,
    rel_tol: float,
    scale: float | None = None,
    slack: float = 0.0,
) -> Check:
    """Apply the rule to one quantity; ``scale`` defaults to ``max(1, max|ref|)``; ``slack`` is added to the tol."""
    if scale is None:
        scale = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
    return Check(quantity, max_abs_err(result, ref), max_abs_err(naive, ref), rel_tol * scale + slack)


def summarize(checks: list[Check]) -> dict[str, Any]:
    """Record fields: ``check`` ("pass" / "fail"), ``errors`` (one readable string), ``accuracy`` (per quantity)."""
    text = "; ".join(f"{c.quantity} {c.err:.2e} (naive {c.naive_err:.2e}, tol {c.tol:.1e})" for c in checks)
    return {
        "check": "pass" if all(c.passed for c in checks) else "fail",
        "errors": text,
        "accuracy": [c.as_dict() for c in checks],
    }
