"""Distributed weights for the fused LM head: an FSDP2 ``DTensor`` weight is gathered once per call with
``full_tensor()`` (autograd returns its gradient, averaged, to the DTensor's placement); a ZeRO-3 partitioned weight
is gathered by the caller's ``gather_context``, entered around the forward and again around the backward sweep."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

GatherContext = Callable[[], contextlib.AbstractContextManager[Any]]


class _GatherDTensor(torch.autograd.Function):
    """All-gather a sharded DTensor parameter; backward reduce-scatters the gradient, averaged over the mesh.

    Each data-parallel rank projects its own tokens with the full weight, so the full-weight gradients differ per rank
    and are partial contributions: backward marks them ``Partial("avg")`` and redistributes them to the parameter's
    placement (a reduce-scatter for ``Shard(0)``), which is what FSDP2 does with the gradients of its own params.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh = weight.device_mesh
        ctx.placements = weight.placements
        return weight.full_tensor()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from torch.distributed.tensor import DTensor, Partial

        partial = DTensor.from_local(grad.contiguous(), ctx.mesh, [Partial("avg")] * ctx.mesh.ndim)
        return partial.redistribute(ctx.mesh, ctx.placements)


def _gather_weight(weight: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) weight is gathered once per call; its gradient is reduce-scattered (averaged) back."""
    if type(weight).__name__ == "DTensor":
        return _GatherDTensor.apply(weight)
    return weight


def _gather_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else _gather_weight(bias)


def _enter(gather_context: GatherContext | None) -> contextlib.AbstractContextManager[Any]:
    return gather_context() if gather_context is not None else contextlib.nullcontext()
