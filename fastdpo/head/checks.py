"""Input checks of the fused LM head, run before any GEMM or kernel: bad input is a Python exception."""

from __future__ import annotations

import math

import torch

from fastdpo._validation import check_float, check_index, check_labels, check_same_device


def _check_positive(name: str, value: float | None, allow_none: bool) -> None:
    if value is None:
        if not allow_none:
            raise TypeError(f"{name} must be a number, got None")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    logit_scale: float,
    temperature: float,
    ignore_index: int,
    validate: bool,
) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_index("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {list(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [..., D] with D = weight.shape[1] = {weight.shape[1]}, got {list(hidden.shape)}"
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {list(hidden.shape[:-1])}, got {list(labels.shape)}"
        )
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    _check_positive("softcap", softcap, allow_none=True)
    _check_positive("logit_scale", logit_scale, allow_none=False)
    _check_positive("temperature", temperature, allow_none=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if validate:
        check_labels(labels, weight.shape[0], ignore_index)
