"""Checks and small helpers shared by the loss modules (private)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo._validation import check_float, check_index, warn_nonfinite_output


def check_scalar(name: str, value: object) -> float:
    """``value`` as a finite float; ``TypeError`` (not a number, or a bool) / ``ValueError`` (NaN, inf) naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive_beta(beta: object, who: str) -> float:
    value = check_scalar("beta", beta)
    if value <= 0:
        raise ValueError(f"{who} needs beta > 0, got {value}")
    return value


def check_seq_tensor(name: str, t: torch.Tensor | None, n: int, *, integer_ok: bool = False) -> None:
    """``t`` is ``None`` or a ``[n]`` float tensor (integer allowed with ``integer_ok``, e.g. token counts)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer_ok and not t.dtype.is_floating_point:
        check_index(name, t)
    else:
        check_float(name, t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one entry per pair), got {list(t.shape)}")


def check_pairs(name_c: str, c: torch.Tensor, name_r: str, r: torch.Tensor | None) -> int:
    """Number of pairs ``P`` of a non-empty ``[P]`` float ``c`` (and ``r`` of the same shape when given)."""
    check_float(name_c, c)
    if c.dim() != 1 or c.shape[0] == 0:
        raise ValueError(f"{name_c} must be a non-empty 1-D [P] tensor, got shape {list(c.shape)}")
    p = c.shape[0]
    if r is not None:
        check_seq_tensor(name_r, r, p)
    return p


def length(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Completion token counts as ``dtype``, clamped at 1 (TRL's ``.clamp(min=1)``)."""
    return t.to(dtype).clamp(min=1.0)


def loss_and_metrics(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss and every metric in one detached vector (one finiteness check, one sync)."""
    parts = [loss, *metrics.values()]
    return torch.stack([t.detach().reshape(()).double() for t in parts])


def checked_output(
    loss: torch.Tensor, metrics: dict[str, torch.Tensor], validate: bool, inputs: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of a public loss, after warning (``RuntimeWarning`` naming the ``inputs`` to look at) when
    ``validate`` and the loss or a metric is NaN/inf (one host sync)."""
    if validate:
        warn_nonfinite_output(loss_and_metrics(loss, metrics), inputs, "loss or metrics", stacklevel=4)
    return loss, metrics


def smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Conservative (label-smoothed) sigmoid loss ``-(1-eps) log sigma(z) - eps log sigma(-z)``, elementwise."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
