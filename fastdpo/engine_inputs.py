"""What one forward pass of :class:`fastdpo.engine.DPOEngine` feeds the model and the fused head.

* The collated batch (:class:`fastdpo.collator.PreferenceCollator`): :func:`check_batch` checks the keys and shapes the
  forwards read (``logp_index``, ``logp_labels``, ``logp_seq``: ``[M]`` over the ``M`` completion tokens of the
  ``2P`` sequences, chosen ``0..P-1`` then rejected ``P..2P-1``; ``input_ids``: ``[rows, length]``) and
  :func:`check_device` that its tensors are on the model's device -- both before any work, with the key named.
* The fused head's call (:func:`call_fused_head`): hidden states ``[M, D]`` and the output-embedding weight ``[V, D]``
  (bias ``[V]``) go through :meth:`fastdpo.models.LMParts.call_head` (so ZeRO-3's module hooks gather the head) with
  the model's logit extras (``softcap``, ``logit_scale``) and, under ``torch.autocast``, in the autocast dtype like
  the model's own ``nn.Linear`` head would run (:func:`head_operands`). Reductions stay fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from fastdpo.models import LMParts

__all__ = ["BATCH_KEYS", "DEVICE_KEYS", "call_fused_head", "check_batch", "check_device", "head_operands"]

_T = TypeVar("_T")

#: the keys every collated batch must carry
BATCH_KEYS: tuple[str, ...] = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "logp_index",
    "logp_labels",
    "logp_seq",
    "chosen_lengths",
    "rejected_lengths",
    "num_pairs",
)
#: batch tensors the forwards and the head consume: they must live on the model's device
DEVICE_KEYS: tuple[str, ...] = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "token_seq",
    "token_role",
    "token_pair",
    "logp_index",
    "logp_labels",
    "logp_seq",
    "logp_pos",
    "chosen_lengths",
    "rejected_lengths",
)


def check_batch(batch: Mapping[str, Any]) -> int:
    """The batch's number of pairs ``P >= 1``; ``TypeError`` for a non-mapping, ``ValueError`` for a missing key,
    ``[M]`` vectors of unequal length, or ``input_ids`` not 2-D."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict from PreferenceCollator, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; pass a batch made by fastdpo.PreferenceCollator")
    num_pairs = int(batch["num_pairs"])
    if num_pairs < 1:
        raise ValueError(f"batch['num_pairs'] must be >= 1, got {num_pairs}")
    m = batch["logp_index"].shape[0]
    for key in ("logp_labels", "logp_seq"):
        if batch[key].shape != (m,):
            raise ValueError(
                f"batch[{key!r}] must have shape [{m}] like batch['logp_index'], got {list(batch[key].shape)}"
            )
    if batch["input_ids"].dim() != 2:
        raise ValueError(f"batch['input_ids'] must be [rows, length], got {list(batch['input_ids'].shape)}")
    return num_pairs


def check_device(parts: LMParts, batch: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key when a batch tensor is not on the model's device (before any work).

    The device is the first plain (non-``DTensor``) parameter's; FSDP2-sharded parameters are skipped (with CPU
    offloading they live on the host while the batch belongs on the accelerator), so a fully sharded model is
    not checked here."""
    param = next((p for p in parts.hf_model.parameters() if type(p).__name__ != "DTensor"), None)
    if param is None:
        return
    device = param.device
    for key in DEVICE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(
                f"batch[{key!r}] is on device {value.device} but the model ({type(parts.hf_model).__name__}) is "
                f"on {device}; move the batch to the model's device first"
            )


def head_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, contextlib.AbstractContextManager]:
    """``(hidden, weight, bias, context)`` to call the fused head with, honouring an enclosing ``torch.autocast``.

    Under autocast (TRL's default bf16/fp16 mixed precision) the model's own ``nn.Linear`` head would run in the
    autocast dtype; so does the fused head: its floating operands (fp32 master weights, fp32 hidden states) are cast
    to that dtype -- differentiably, the gradients reach the fp32 parameters -- and the head runs inside ``context``,
    autocast off, so its forward GEMMs and its backward recompute use one precision (under autocast, some of the
    head's internal GEMMs would be recast and others not). Reductions stay fp32 as always. Without autocast the
    operands are returned unchanged with a null context.
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        # like autocast itself: floating tensors other than float64 go to the autocast dtype
        return t if t is None or t.dtype in (dtype, torch.float64) or not t.is_floating_point() else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device_type, enabled=False)


def call_fused_head(parts: LMParts, hidden: torch.Tensor, head: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``head(hidden, weight, *args, bias=, gather_context=, softcap=, logit_scale=, **kwargs)`` -- a fused head of
    :mod:`fastdpo.head` on ``hidden`` ``[M, D]`` with ``parts``' output projection, run as
    :meth:`~fastdpo.models.LMParts.call_head` runs it (under ZeRO-3 as a call of the head module, so its hooks gather
    the weight) with the operands of :func:`head_operands` (the autocast dtype, if any)."""

    def run(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gather: Any) -> _T:
        h, weight, bias, context = head_operands(h, weight, bias)
        with context:
            return head(
                h,
                weight,
                *args,
                bias=bias,
                gather_context=gather,
                softcap=parts.softcap,
                logit_scale=parts.logit_scale,
                **kwargs,
            )

    return parts.call_head(run, hidden)
