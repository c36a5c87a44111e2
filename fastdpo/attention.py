"""Attention plumbing for packed preference batches: turn a collated batch into HF model-forward kwargs.

``build_attention_kwargs(batch, model)`` returns ``{"position_ids": ..., "attention_mask": ...}`` (plus the flash
varlen keys) to pass as ``model(input_ids=batch["input_ids"], **kwargs)``. Which attention pattern a packed row needs:

* "padding_free": causal inside each sequence (``token_seq`` equal), nothing across sequences;
* "prefix_shared": causal inside each pair (``token_pair`` equal), except that rejected tokens (role 2) never see
  chosen tokens (role 1) -- the prompt is shared, both completions continue its positions;
* padding tokens see only themselves (no fully masked softmax row, hence no NaN anywhere in the forward/backward);
* sliding-window layers additionally require ``position_q - position_k < sliding_window`` -- measured in *position
  ids*, so a rejected token's distance to the prompt is the one it would have in its own unpacked sequence.

How transformers 5.x takes a custom mask (``masking_utils._preprocess_mask_arguments``): a 4-D tensor or a
``BlockMask`` is used as-is, skipping HF's own causal/sliding/padding construction. The eager attention *adds* the mask
to the scores, so it must be an additive float mask (0 / dtype-min) in the model dtype; SDPA takes a bool mask
(True = attend) or an additive float one; FlexAttention takes a ``BlockMask``. Models with per-layer attention types
(Gemma2, Qwen2 with sliding layers, ...) accept a dict ``{"full_attention": m, "sliding_attention": m_sw}``, which is
what we return for them; a model with a global ``sliding_window`` and no ``layer_types`` (Mistral) gets one mask with
the window applied. Flash-attention-2/3 cannot express these masks, but does padding-free natively through varlen
``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs ("padding_free" only; "prefix_shared" + flash raises).

Formats (``impl``): ``"auto"`` (from ``model.config._attn_implementation``), ``"sdpa"`` (bool 4-D ``[R, 1, L, L]``),
``"eager"`` (additive float 4-D, also valid for sdpa/flex models), ``"flex_attention"`` (``BlockMask``),
``"flash_varlen"`` (no mask; cu_seqlens). ``"pad"`` batches always get their plain 2-D ``attention_mask``.

Limits:

* a 4-D mask costs ``R * L * L`` bytes (bool) or 4x that (fp32 eager) -- ~256 MB for one 16k-token row; use
  flex_attention or flash varlen for long packed rows.
* Gemma2: transformers refuses sdpa for it (attention softcapping), so "auto" means eager there; the softcap is applied
  by the model before the additive mask (eager) or inside its score_mod (flex), so it composes with these masks. Its
  alternating sliding layers get their own windowed mask (dict above), measured in position ids: exact for sequences
  shorter *and* longer than the window (tested with window 5). With a single 4-D tensor instead of the dict, HF would
  use it for the sliding layers too and silently drop the window -- so pass the returned dict as is.
* only ``full_attention``/``sliding_attention`` layer types are understood; chunked (Llama-4) or linear-attention
  hybrids raise ``NotImplementedError``.
* flex_attention through transformers is ``torch.compile``-d; on CPU (torch 2.13) inductor takes tens of seconds per
  shape and fails to build its C++ kernel for sliding-window masks -- flex is for CUDA; sdpa/eager work everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

IMPLS: tuple[str, ...] = ("auto", "sdpa", "eager", "flex_attention", "flash_varlen")
_FLASH_NAMES = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
_KNOWN_LAYER_TYPES = ("full_attention", "sliding_attention")


def _model_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers model with a .config, got {type(model).__name__}")
    return config


def model_attn_implementation(model: Any) -> str:
    """The attention implementation the model runs (``config._attn_implementation``; unset means eager)."""
    impl = getattr(_model_config(model), "_attn_implementation", None)
    return impl or "eager"


def _is_flash(attn: str) -> bool:
    return attn in _FLASH_NAMES or "flash" in attn


def resolve_impl(packing: str, attn: str, impl: str = "auto") -> str:
    """Pick the mask format for a packing and a model attention implementation; raise on impossible pairs.

    Returns one of ``"2d"``, ``"sdpa"``, ``"eager"``, ``"flex_attention"``, ``"flash_varlen"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if packing == "pad":
        return "2d"
    if packing not in ("padding_free", "prefix_shared"):
        raise ValueError(f"batch['packing'] must be 'pad', 'padding_free' or 'prefix_shared', got {packing!r}")
    if impl == "auto":
        if attn == "sdpa":
            impl = "sdpa"
        elif attn == "eager":
            impl = "eager"
        elif attn == "flex_attention":
            impl = "flex_attention"
        elif _is_flash(attn):
            impl = "flash_varlen"
        else:
            raise ValueError(
                f"cannot build a packed-row attention mask for attn_implementation={attn!r}; load the model with "
                f"attn_implementation 'sdpa', 'eager', 'flex_attention' or 'flash_attention_2', or use packing='pad'"
            )
    if impl == "flash_varlen":
        if packing == "prefix_shared":
            raise ValueError(
                "packing='prefix_shared' needs a custom attention mask (rejected tokens must not see chosen tokens), "
                "which flash-attention varlen cannot express; use sdpa/eager/flex_attention or packing='padding_free'"
            )
        if not _is_flash(attn):
            raise ValueError(f"impl='flash_varlen' needs a flash_attention_2/3 model, got attn_implementation={attn!r}")
        return impl
    # mask-based formats: check the model's attention function can read them
    if _is_flash(attn):
        raise ValueError(
            f"impl={impl!r} builds a 4-D/block mask, but the model runs {attn!r}, which ignores such masks; "
            f"use impl='flash_varlen' (padding_free) or load the model with sdpa/eager/flex_attention"
        )
    compatible = {"eager": ("eager",), "sdpa": ("sdpa", "eager"), "flex_attention": ("flex_attention", "eager")}.get(
        attn
    )
    if compatible is None:
        raise ValueError(f"unsupported attn_implementation={attn!r} for packed rows")
    if impl not in compatible:
        raise ValueError(
            f"impl={impl!r} does not match the model's attn_implementation={attn!r} (it accepts {compatible}); "
            f"e.g. a bool sdpa mask would be *added* to the scores by eager attention"
        )
    return impl


def allowed_mask(
    batch: dict[str, Any], *, sliding_window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Bool ``[R, L, L]``: ``out[r, q, k]`` is True when token ``q`` of row ``r`` may attend to token ``k``.

    Built from ``token_seq``/``token_pair``/``token_role``/``position_ids`` of a packed batch (see module docstring).
    """
    packing = batch["packing"]
    if packing not in ("padding_free", "prefix_shared"):
        raise ValueError(f"allowed_mask needs a packed batch ('padding_free' or 'prefix_shared'), got {packing!r}")
    seq = batch["token_seq"].to(device)
    pos = batch["position_ids"].to(device=seq.device, dtype=torch.int32)
    pair = batch["token_pair"].to(seq.device)
    role = batch["token_role"].to(seq.device)
    R, L = seq.shape
    idx = torch.arange(L, device=seq.device)
    causal = idx[:, None] >= idx[None, :]
    out = torch.empty((R, L, L), dtype=torch.bool, device=seq.device)
    for r in range(R):  # one row at a time, in place: peak extra memory ~L*L, not R*L*L
        m = out[r]
        if packing == "padding_free":
            torch.eq(seq[r, :, None], seq[r, None, :], out=m)
        else:
            torch.eq(pair[r, :, None], pair[r, None, :], out=m)
            m &= ~((role[r, :, None] == 2) & (role[r, None, :] == 1))
        m &= causal
        real = seq[r] >= 0
        m &= real[:, None]
        if sliding_window is not None:
            m &= (pos[r, :, None] - pos[r, None, :]) < sliding_window
        # padding queries see themselves only: no all-masked softmax rows (NaN) in forward or backward
        pad = (~real).nonzero().flatten()
        m[pad, pad] = True
    return out


def _layer_windows(config: Any) -> dict[str, int | None]:
    """``{layer_type: window}`` for models with distinct per-layer types, else ``{"": window}`` (one mask)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return {"": window}
    kinds = set(layer_types)
    unknown = kinds - set(_KNOWN_LAYER_TYPES)
    if unknown:
        raise NotImplementedError(f"packed rows support layer types {_KNOWN_LAYER_TYPES}, model has {sorted(unknown)}")
    if kinds == {"full_attention"}:
        return {"": None}
    if window is None:
        raise ValueError("model has sliding_attention layers but config.sliding_window is None")
    return {k: (window if k == "sliding_attention" else None) for k in sorted(kinds)}


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    device, dtype = None, None
    for p in model.parameters():
        if device is None:
            device = p.device
        if p.is_floating_point():
            dtype = p.dtype
            device = p.device
            break
    dtype = getattr(model, "dtype", None) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32
    return device or torch.device("cpu"), dtype


def _flex_block_mask(batch: dict[str, Any], sliding_window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    packing = batch["packing"]
    seq = batch["token_seq"].to(device)
    pos = batch["position_ids"].to(device)
    pair = batch["token_pair"].to(device)
    role = batch["token_role"].to(device)
    R, L = seq.shape

    def mask_mod(b, h, q, k):
        sq, sk = seq[b, q], seq[b, k]
        if packing == "padding_free":
            same = sq == sk
        else:
            same = (pair[b, q] == pair[b, k]) & ~((role[b, q] == 2) & (role[b, k] == 1))
        ok = (q >= k) & same & (sq >= 0)
        if sliding_window is not None:
            ok = ok & ((pos[b, q] - pos[b, k]) < sliding_window)
        return ok | ((q == k) & (sq < 0))

    return create_block_mask(mask_mod, R, None, L, L, device=device)


def _flash_varlen_kwargs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Flash varlen kwargs, every tensor built on ``device`` (the model's): ``cu_seq_lens`` int32 ``[S + 1]``."""
    seq = batch["token_seq"].to(device)
    R, L = seq.shape
    # one segment per (row, sequence), padding tails being segments of their own
    key = (torch.arange(R, device=device)[:, None] * (seq.max().clamp(min=0) + 2) + seq + 1).reshape(-1)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([R * L], device=device)])
    cu = bounds.to(dtype=torch.int32)
    max_len = int((bounds[1:] - bounds[:-1]).max())  # one host sync; flash-attention takes it as a Python int
    return {
        "position_ids": batch["position_ids"].to(device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def build_attention_kwargs(batch: dict[str, Any], model: Any, *, impl: str = "auto") -> dict[str, Any]:
    """Extra HF forward kwargs for a collated batch: ``model(input_ids=batch["input_ids"], **kwargs)``.

    Args:
        batch: output of :class:`fastdpo.PreferenceCollator` (needs ``packing``, ``attention_mask``,
            ``position_ids``, ``token_seq``, ``token_pair``, ``token_role``; int64 ``[R, L]``).
        model: the HF causal LM (PEFT-wrapped is fine); its ``config._attn_implementation`` picks the format.
        impl: ``"auto"`` or a forced format (see module docstring); impossible combinations raise ``ValueError``.

    Returns:
        dict with ``position_ids`` (int64 ``[R, L]``) and either ``attention_mask`` -- 2-D int64 ``[R, L]`` ("pad"),
        bool ``[R, 1, L, L]`` (sdpa), float ``[R, 1, L, L]`` additive in the model dtype (eager), a ``BlockMask``
        (flex), or a dict of those keyed by layer type (sliding-window models) -- or flash varlen keys
        ``cu_seq_lens_q/k`` (int32 ``[S+1]``) and ``max_length_q/k`` (int). Tensors are on the model's device.
    """
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be the dict a PreferenceCollator returns, got {type(batch).__name__}")
    missing = [
        k
        for k in ("packing", "attention_mask", "position_ids", "token_seq", "token_pair", "token_role")
        if k not in batch
    ]
    if missing:
        raise ValueError(f"batch lacks {missing}; build it with fastdpo.PreferenceCollator")
    config = _model_config(model)
    fmt = resolve_impl(batch["packing"], model_attn_implementation(model), impl)
    device, dtype = _model_device_dtype(model)
    if fmt == "2d":
        return {"attention_mask": batch["attention_mask"].to(device), "position_ids": batch["position_ids"].to(device)}
    if fmt == "flash_varlen":
        return _flash_varlen_kwargs(batch, device)
    windows = _layer_windows(config)
    masks: dict[str, Any] = {}
    for layer_type, window in windows.items():
        if fmt == "flex_attention":
            masks[layer_type] = _flex_block_mask(batch, window, device)
            continue
        allowed = allowed_mask(batch, sliding_window=window, device=device)[:, None]
        if fmt == "sdpa":
            masks[layer_type] = allowed
        else:  # eager: additive float mask in the model dtype
            zero = torch.zeros((), dtype=dtype, device=device)
            masks[layer_type] = torch.where(allowed, zero, torch.finfo(dtype).min)
    mask = masks.get("", masks)
    return {"attention_mask": mask, "position_ids": batch["position_ids"].to(device)}
