"""Ulysses sequence-parallel attention, registered as a transformers attention implementation.

Each rank of a sequence-parallel group of size ``k`` runs the model on a contiguous slice of ``Ls = L / k`` columns of
every row. Everything but attention is position-local, so only attention needs the other slices:
:func:`ulysses_attention_forward` turns the sequence-sharded ``q``/``k``/``v`` (``[B, H, Ls, d]``, what the model's
attention module hands to its attention function) into head-sharded ones (``[B, H/k, L, d]``) with one all-to-all
each, calls the model's *own* attention implementation on the full sequence for its heads (transformers' ``sdpa`` /
``flex_attention`` / ``flash_attention_*`` functions, or the model file's ``eager_attention_forward`` -- so Gemma 2's
attention soft-capping and sliding windows keep working) and turns the output ``[B, L, H/k, d]`` back into
``[B, Ls, H, d]`` with a fourth all-to-all. The all-to-all is its own inverse, so its backward is the same exchange
(:class:`_AllToAll`).

Registration (:func:`enable_ulysses_attention`): the model's ``config._attn_implementation`` becomes
``"fastdpo_ulysses_<impl>"`` (e.g. ``fastdpo_ulysses_sdpa``), registered in transformers' ``AttentionInterface`` and,
with the underlying implementation's mask function, in its ``AttentionMaskInterface`` -- no model code is patched.
Without a :class:`UlyssesContext` in the forward kwargs the function *is* the underlying implementation (the model
behaves exactly as before outside a sequence-parallel step, generation included). With one, it needs the masks for the
*full* length: the model receives a full-length 4-D mask, a dict of them per layer type or a ``BlockMask`` as its
``attention_mask`` (transformers passes those through untouched) or flash varlen ``cu_seq_lens_*`` kwargs, or no mask
where causality alone is exact (see :mod:`fastdpo.sequence_parallel`), and the context carries the full-length
position ids (flash reads them to find packed sequences). A mask of another length raises instead of broadcasting.

GQA: with ``KVH`` key/value heads and ``k`` ranks, key/value heads are first repeated ``rep = k / gcd(KVH, k)`` times
(``repeat_interleave`` order, as transformers' ``repeat_kv``), so that every rank receives whole groups: query head
``h`` still meets key/value head ``h // (H / KVH)``. The underlying function sees ``num_key_value_groups = H / (KVH ·
rep)`` through a thin view of the attention module. The only requirement is ``H % k == 0`` (checked up front by
:func:`check_heads`).

Attention weights are not returned under sequence parallelism (``output_attentions`` is unsupported); attention dropout
would draw different masks than a single process (the engine disables dropout by default).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "KWARG",
    "PREFIX",
    "UlyssesContext",
    "check_heads",
    "enable_ulysses_attention",
    "register_ulysses_attention",
    "ulysses_attention_forward",
    "underlying_implementation",
]

#: prefix of the registered implementation names: ``fastdpo_ulysses_sdpa`` etc.
PREFIX = "fastdpo_ulysses_"
#: the forward kwarg carrying the :class:`UlyssesContext` down to the attention function
KWARG = "fastdpo_ulysses"
#: implementations that can run under Ulysses (the model's own must be one of them)
UNDERLYING: tuple[str, ...] = (
    "eager",
    "sdpa",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)


@dataclass(frozen=True)
class UlyssesContext:
    """What the attention function needs of the sequence-parallel group, passed as the ``fastdpo_ulysses`` forward
    kwarg (it travels with the kwargs through wrappers and gradient-checkpoint recomputation).

    Attributes:
        group: the sequence-parallel process group (``None`` only when ``size == 1``).
        size: ``k``, the group size.
        position_ids: int64 ``[B, L]`` position ids of the full (padded) rows, or ``None``.
    """

    group: Any
    size: int
    position_ids: torch.Tensor | None = None


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 (chunk ``j`` goes to rank ``j``; chunk ``j`` of the output came from
    rank ``j``). Exchanging the gradient's chunks the same way is the exact adjoint, so backward is the same call."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable all-to-all of ``x`` split along dim 0 into ``group.size()`` equal chunks."""
    return _AllToAll.apply(x, group)


def seq_to_heads(x: torch.Tensor, ctx: UlyssesContext) -> torch.Tensor:
    """``[B, N, Ls, d]`` sequence shard of every head -> ``[B, N/k, k·Ls, d]`` full sequence of this rank's heads."""
    b, n, ls, d = x.shape
    k = ctx.size
    # [k (destination head group), B, N/k, Ls, d]: chunk j holds head group j of this rank's columns
    send = x.reshape(b, k, n // k, ls, d).transpose(0, 1)
    recv = all_to_all(send, ctx.group)  # [k (source rank = column block), B, N/k, Ls, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n // k, k * ls, d)


def heads_to_seq(y: torch.Tensor, ctx: UlyssesContext) -> torch.Tensor:
    """``[B, k·Ls, n, d]`` (attention output of this rank's ``n`` heads) -> ``[B, Ls, k·n, d]`` (this rank's columns,
    every head) -- the inverse of :func:`seq_to_heads` in the attention functions' output layout."""
    b, length, n, d = y.shape
    k = ctx.size
    ls = length // k
    send = y.reshape(b, k, ls, n, d).transpose(0, 1)  # chunk j: column block j, this rank's heads
    recv = all_to_all(send, ctx.group)  # [k (source rank = head group), B, Ls, n, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ls, k * n, d)


def _repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """``[B, KVH, L, d]`` -> ``[B, KVH·rep, L, d]``, head ``j`` of the output being head ``j // rep`` of the input."""
    if rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, rep, length, d).reshape(b, h * rep, length, d)


class _ModuleView:
    """The attention module with a few attributes overridden (``num_key_value_groups`` after key/value replication,
    ``config`` naming the underlying implementation for flash); everything else reads through to the module."""

    def __init__(self, module: Any, **overrides: Any) -> None:
        self.__dict__["_module"] = module
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def underlying_implementation(name: str | None) -> str | None:
    """``"sdpa"`` for ``"fastdpo_ulysses_sdpa"`` etc.; ``None`` for a name that is not a Ulysses implementation."""
    if isinstance(name, str) and name.startswith(PREFIX) and name[len(PREFIX) :] in UNDERLYING:
        return name[len(PREFIX) :]
    return None


def _underlying_function(module: Any, impl: str) -> Callable[..., Any]:
    if impl == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(
                f"{type(module).__name__} has no module-level eager_attention_forward in {type(module).__module__}; "
                "sequence parallelism with eager attention needs the model file's eager function"
            )
        return fn
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface._global_mapping[impl]


def _flash_config(module: Any, impl: str) -> Any:
    """A shallow copy of the module's config naming the real flash implementation (flash reads it to pick its
    kernels); the model's own config keeps the Ulysses name."""
    config = copy.copy(module.config)
    config._attn_implementation_internal = impl
    return config


def _check_mask_length(mask: Any, length: int) -> None:
    shape = getattr(mask, "shape", None)
    if shape is not None and len(shape) == 4 and shape[-1] != length:
        raise ValueError(
            f"sequence-parallel attention got a mask for {shape[-1]} keys, but the full sequence has {length}: the "
            "model must receive the full-length mask (run it through fastdpo's DPOEngine(sequence_parallel_size=k))"
        )


def ulysses_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    underlying: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention function with transformers' signature (registered per ``underlying``; see the module docstring).

    Args:
        query: ``[B, H, Ls, d]``; key, value: ``[B, KVH, Ls, d]`` -- this rank's columns.
        attention_mask: full-length mask (``[B, 1, L, L]`` tensor, ``BlockMask``) or ``None``.
        underlying: the implementation doing the work (``"sdpa"``, ``"eager"``, ...).
        kwargs: the model's (``scaling``, ``dropout``, ``sliding_window``, ``softcap``, ...) plus
            ``fastdpo_ulysses``: a :class:`UlyssesContext`, or absent (plain call of the underlying function).

    Returns:
        ``(output [B, Ls, H, d], None)`` (the underlying function's own output when there is no context).
    """
    ctx: UlyssesContext | None = kwargs.pop(KWARG, None)
    fn = _underlying_function(module, underlying)
    overrides: dict[str, Any] = {}
    if underlying.startswith("flash_attention"):
        overrides["config"] = _flash_config(module, underlying)
    if ctx is None or ctx.size == 1:
        if ctx is not None and ctx.position_ids is not None:
            kwargs["position_ids"] = ctx.position_ids
        return fn(
            _ModuleView(module, **overrides) if overrides else module, query, key, value, attention_mask, **kwargs
        )
    k = ctx.size
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % k:
        raise ValueError(f"{heads} attention heads cannot be split over a sequence-parallel group of {k} ranks")
    _check_mask_length(attention_mask, k * query.shape[2])
    rep = k // math.gcd(kv_heads, k)
    groups = heads // (kv_heads * rep)
    q = seq_to_heads(query, ctx)
    kk = seq_to_heads(_repeat_kv(key, rep), ctx)
    v = seq_to_heads(_repeat_kv(value, rep), ctx)
    if ctx.position_ids is not None:
        kwargs["position_ids"] = ctx.position_ids
    if groups != getattr(module, "num_key_value_groups", groups):
        overrides["num_key_value_groups"] = groups
    out, _ = fn(_ModuleView(module, **overrides) if overrides else module, q, kk, v, attention_mask, **kwargs)
    return heads_to_seq(out, ctx), None


def register_ulysses_attention() -> None:
    """Register ``fastdpo_ulysses_<impl>`` for every supported ``impl`` in transformers' attention and attention-mask
    interfaces (idempotent). The mask function is the underlying implementation's, so the model builds the masks it
    would build anyway whenever it is not given a pre-built one."""
    import functools

    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for impl in UNDERLYING:
        name = PREFIX + impl
        if name in AttentionInterface._global_mapping:
            continue
        AttentionInterface.register(name, functools.partial(ulysses_attention_forward, underlying=impl))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[impl])


def check_heads(config: Any, size: int) -> None:
    """Raise ``ValueError`` unless the attention heads of ``config`` (text config of multimodal ones) split over
    ``size`` ranks: ``num_attention_heads % size == 0`` (key/value heads are replicated as needed)."""
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else config
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"cannot read num_attention_heads from {type(config).__name__}")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(
            f"sequence_parallel_size={size} does not divide the model's {heads} attention heads "
            f"({kv_heads} key/value heads): each rank attends with num_attention_heads / sequence_parallel_size heads; "
            f"choose a size dividing {heads}"
        )


def enable_ulysses_attention(hf_model: Any, size: int) -> str:
    """Switch a Hugging Face model (not a wrapper) to its Ulysses implementation; returns the underlying name.

    Idempotent. Raises ``ValueError`` when the heads do not split over ``size`` ranks (:func:`check_heads`) or the
    model's implementation cannot run under Ulysses, ``TypeError`` for a model without a config.
    """
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "set_attn_implementation"):
        raise TypeError(f"sequence parallelism needs a transformers PreTrainedModel, got {type(hf_model).__name__}")
    check_heads(config, size)
    current = getattr(config, "_attn_implementation", None) or "eager"
    impl = underlying_implementation(current)
    if impl is not None:
        return impl
    if current not in UNDERLYING:
        raise ValueError(
            f"sequence parallelism wraps the model's attention implementation, which must be one of {UNDERLYING}; "
            f"got {current!r}"
        )
    register_ulysses_attention()
    hf_model.set_attn_implementation(PREFIX + current)
    if getattr(hf_model.config, "_attn_implementation", None) != PREFIX + current:
        raise ValueError(
            f"{type(hf_model).__name__} does not let fastdpo set its attention implementation "
            "(it does not use transformers' AttentionInterface)"
        )
    return current
