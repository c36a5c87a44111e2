"""Input checks of the fused LM head, run before any GEMM or kernel: bad input is a Python exception. The scalar
options are checked when their :class:`~fastdpo.head.options.HeadOptions` is made; :func:`_check_inputs` checks the
tensors against each other and (with ``validate``) the label range."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastdpo._validation import check_float, check_index, check_labels, check_number, check_same_device

if TYPE_CHECKING:
    from fastdpo.head.options import HeadOptions


def _check_positive(name: str, value: float | None, allow_none: bool) -> None:
    if value is None:
        if not allow_none:
            raise TypeError(f"{name} must be a number, got None")
        return
    check_number(name, value, positive=True)


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, options: HeadOptions
) -> None:
    """``hidden [..., D]``, ``weight [V, D]`` (V >= 1), ``labels`` of ``hidden.shape[:-1]``, ``bias [V]`` | None, on
    one device; with ``options.validate`` every label ``options.ignore_index`` or in ``[0, V)`` (one sync)."""
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
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if options.validate:
        check_labels(labels, weight.shape[0], options.ignore_index)
