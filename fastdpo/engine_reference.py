"""The reference side of :class:`fastdpo.engine.DPOEngine`: where its reference log-probs come from, in three modes.

* ``"model"``: a separate frozen causal LM (``eval()``, no ``requires_grad``), also a bitsandbytes 8/4-bit copy
  (:func:`fastdpo.quantize.quantize_model`; ``ref_quantization=8|4`` makes one from the policy's current weights);
* ``"adapter"``: the policy is a PEFT model, the reference is the same model under ``disable_adapter()``
  (:func:`reference_context`);
* ``"precomputed"``: ``(chosen [P], rejected [P])`` fp32 log-probs read from a
  :class:`fastdpo.ref_cache.RefLogpCache` (checked against the engine's settings, and the reference model when one is
  given), or from the batch's TRL-style ``ref_chosen_logps`` / ``ref_rejected_logps`` columns
  (:func:`batch_reference_logps`) -- no reference weights at all.

:func:`build_reference` checks a mode's arguments and returns what the engine keeps; :func:`reference_fingerprint`
stamps a cache with the weights its log-probs came from. The live modes' forwards are the engine's own
(:meth:`fastdpo.engine.DPOEngine.compute_logps`, under :func:`quiet_bnb`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fastdpo.models import is_peft_model, keep_requires_grad, unwrap_ddp
from fastdpo.quantize import quantize_model
from fastdpo.ref_cache import RefLogpCache, model_fingerprint

__all__ = [
    "REFERENCE_MODES",
    "batch_reference_logps",
    "build_reference",
    "quiet_bnb",
    "reference_context",
    "reference_fingerprint",
]

REFERENCE_MODES: tuple[str, ...] = ("model", "adapter", "precomputed")


def build_reference(
    reference: str,
    model: nn.Module,
    ref_model: nn.Module | None,
    ref_cache: RefLogpCache | str | os.PathLike[str] | None,
    ref_quantization: int | None,
    settings: dict[str, float | None],
) -> tuple[nn.Module | None, RefLogpCache | None]:
    """``(reference model, reference cache)`` the engine keeps for mode ``reference`` and policy ``model``.

    ``"model"``: ``ref_model`` (or its / the policy's bitsandbytes copy under ``ref_quantization``) put in eval mode
    and frozen; ``"adapter"``: neither (the policy's PEFT base is the reference); ``"precomputed"``: ``ref_cache``
    loaded from a path or checked (``settings``: the engine's :attr:`~fastdpo.engine.DPOEngine.ref_settings`;
    ``ref_model``: the model it must have been built from), or ``None`` to read the batch's columns.

    Raises ``ValueError`` / ``TypeError`` for arguments the mode does not take or lacks.
    """
    if reference == "model":
        return _frozen_reference_model(model, ref_model, ref_cache, ref_quantization), None
    if reference == "adapter":
        if ref_model is not None or ref_cache is not None or ref_quantization is not None:
            raise ValueError("reference='adapter' takes no ref_model, ref_cache or ref_quantization")
        if not is_peft_model(unwrap_ddp(model)) or not hasattr(unwrap_ddp(model), "disable_adapter"):
            raise ValueError(
                f"reference='adapter' needs a PEFT model (with disable_adapter()), got {type(model).__name__}"
            )
        return None, None
    if ref_quantization is not None:
        raise ValueError("ref_quantization is only used with reference='model'")
    if ref_cache is None:
        if ref_model is not None:
            raise ValueError(
                "reference='precomputed' without ref_cache reads the batch's ref_*_logps; "
                "ref_model is only used to check a ref_cache"
            )
    elif isinstance(ref_cache, (str, os.PathLike)):
        ref_cache = RefLogpCache.load(ref_cache, model=ref_model, settings=settings)
    elif isinstance(ref_cache, RefLogpCache):
        ref_cache.check(model=ref_model, settings=settings)
    else:
        raise TypeError(f"ref_cache must be a RefLogpCache or a path, got {type(ref_cache).__name__}")
    return None, ref_cache


def _frozen_reference_model(
    model: nn.Module, ref_model: nn.Module | None, ref_cache: Any, ref_quantization: int | None
) -> nn.Module:
    """``reference="model"``: the frozen reference (quantized first under ``ref_quantization``)."""
    if ref_cache is not None:
        raise ValueError("ref_cache is only used with reference='precomputed'")
    if ref_quantization is not None:
        if ref_quantization not in (4, 8):
            raise ValueError(f"ref_quantization must be 4, 8 or None, got {ref_quantization!r}")
        ref_model = quantize_model(ref_model if ref_model is not None else unwrap_ddp(model), ref_quantization)
    if ref_model is None:
        raise ValueError(
            "reference='model' needs ref_model (or ref_quantization=8|4 to build a quantized copy of the "
            "policy); use reference='adapter' for a PEFT policy or 'precomputed' with ref_cache"
        )
    if ref_model is model:
        raise ValueError("ref_model must be a separate model (the policy changes during training)")
    ref_model.eval()
    ref_model.requires_grad_(False)
    return ref_model


@contextlib.contextmanager
def reference_context(reference: str, model: nn.Module, ref_model: nn.Module | None) -> Iterator[nn.Module]:
    """The module whose forward gives the reference log-probs of a live mode: ``ref_model``, or under ``"adapter"``
    the policy ``model`` with its adapters disabled for the duration of the context."""
    if reference == "adapter":
        # keep_requires_grad: PEFT re-enables requires_grad on the parameters registered when the context exits
        # (under FSDP2 possibly the unsharded copies), see fastdpo.models.keep_requires_grad
        with keep_requires_grad(model), unwrap_ddp(model).disable_adapter():
            yield model
    else:
        assert ref_model is not None
        yield ref_model


def batch_reference_logps(batch: Mapping[str, Any], num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [P], rejected [P])`` fp32 on ``input_ids``' device from the batch's ``ref_chosen_logps`` /
    ``ref_rejected_logps`` (rows carrying TRL-style precomputed columns); ``ValueError`` when missing or not ``[P]``."""
    if "ref_chosen_logps" not in batch or "ref_rejected_logps" not in batch:
        raise ValueError(
            "reference='precomputed' without ref_cache needs batch['ref_chosen_logps'] and "
            "batch['ref_rejected_logps'] (rows with those columns, or pass ref_cache)"
        )
    device = batch["input_ids"].device
    out = []
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        t = torch.as_tensor(batch[key], dtype=torch.float32, device=device)
        if t.shape != (num_pairs,):
            raise ValueError(f"batch[{key!r}] must have shape [{num_pairs}], got {list(t.shape)}")
        out.append(t)
    return out[0], out[1]


def reference_fingerprint(
    reference: str, model: nn.Module, ref_model: nn.Module | None, ref_cache: RefLogpCache | None
) -> str:
    """Fingerprint of the reference (for cache stamps): the ref model, the PEFT base of ``model`` under
    ``"adapter"``, or the cache's own stamp; ``ValueError`` when the log-probs come from the batch."""
    if reference == "adapter":
        return model_fingerprint(unwrap_ddp(model), exclude_adapters=True)
    if reference == "model":
        assert ref_model is not None
        return model_fingerprint(ref_model)
    if ref_cache is None:
        raise ValueError("reference log-probs come from the batch: there is no reference model to fingerprint")
    return ref_cache.model_hash


@contextlib.contextmanager
def quiet_bnb() -> Iterator[None]:
    """Silence bitsandbytes' per-call fp32->fp16 cast notice of 8-bit matmuls (expected for a reference model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
        yield
