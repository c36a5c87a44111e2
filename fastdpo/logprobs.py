"""Log-probabilities of label tokens from logits, without materializing ``log_softmax``.

For a token row ``x`` (``V`` logits) and label ``y``: ``logp = x_y - logsumexp(x)`` and
``dlogp/dx = onehot(y) - softmax(x)``. Forward saves only the per-token ``logsumexp`` (``[N]`` fp32) besides the
logits; backward forms ``g * (onehot - softmax)`` in one pass, optionally in place into the logits buffer.

Backends (see :mod:`fastdpo._dispatch`):
- ``"triton"``: :mod:`fastdpo.kernels.logprobs`, one program per token row, looping over ``V`` in blocks.
- ``"torch"``: the same math chunked over rows, so no ``[N, V]`` fp32 temporary exists beyond one chunk.

Public functions: :func:`sequence_logprobs` and :func:`token_logprobs`. Their naive oracle
(``log_softmax`` + ``gather``; the benchmark baseline) is :func:`fastdpo.reference.naive_sequence_logprobs`, still
importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import torch

from fastdpo._dispatch import Backend, resolve_backend
from fastdpo._dtypes import accumulate_dtype
from fastdpo._launch import KernelLaunch, aligned_base, launch, next_pow2
from fastdpo._validation import (
    check_float,
    check_index,
    check_int,
    check_keywords,
    check_labels,
    check_same_device,
    refuse_double_backward,
    warn_nonfinite_output,
)
from fastdpo.reference import naive_sequence_logprobs  # noqa: F401 - moved to fastdpo.reference; old import path
from fastdpo.segments import check_segments, segment_counts, segment_sum

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Default elements of one torch-path fp32 chunk ([rows, V]): 16 Mi elements = 64 MiB.
_TORCH_CHUNK_ELEMENTS = 1 << 24


class TokenLogprobsKeywords(TypedDict, total=False):
    """The keywords of :func:`token_logprobs` that :func:`sequence_logprobs` takes as ``**token_options``, for type
    checkers (``Unpack[TokenLogprobsKeywords]``); meaning and defaults are :func:`token_logprobs`'s."""

    ignore_index: int
    inplace_backward: bool
    validate: bool
    backend: Backend
    block_v: int | None
    chunk_rows: int | None


class _Options(NamedTuple):
    """The keywords of :func:`token_logprobs` (:func:`sequence_logprobs` takes them as ``**token_options``), fixed
    for one call; after :func:`_prepare` ``backend`` is the concrete one (``"triton"`` or ``"torch"``)."""

    ignore_index: int = -100
    inplace_backward: bool = False
    validate: bool = True
    backend: Backend = "auto"
    block_v: int | None = None
    chunk_rows: int | None = None

    @classmethod
    def of(cls, where: str, keywords: dict[str, Any]) -> _Options:
        """The options of keyword arguments; ``TypeError`` for any other keyword, as for an explicit signature."""
        check_keywords(f"{where}()", keywords, cls._fields, "its keywords")
        return cls(**keywords)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def _triton_config(vocab: int, block_v: int | None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab``: 4096-wide blocks by default (fewer for small V)."""
    if block_v is None:
        block_v = min(4096, next_pow2(vocab))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    num_warps = 8 if block_v >= 4096 else 4 if block_v >= 1024 else 2
    return block_v, num_warps


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _TORCH_CHUNK_ELEMENTS // vocab)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return chunk_rows


# ---------------------------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------------------------


def _vector(t: torch.Tensor) -> int:
    """Elements per 16-byte vector along the vocabulary (1 when it is strided: scalar slots, no cross-thread work)."""
    return 16 // t.element_size() if t.stride(-1) == 1 else 1


def _row_launch(
    kernel: Any, logits3: torch.Tensor, args: tuple[Any, ...], align: int, options: _Options
) -> KernelLaunch:
    """``kernel[(B * T,)](*args, options.ignore_index)``, one program per row of ``logits3 [B, T, V]``, with the
    ``BLOCK_V`` / ``num_warps`` of :func:`_triton_config` and ``ALIGN = align`` (elements per vector access)."""
    B, T, V = logits3.shape
    block, warps = _triton_config(V, options.block_v)
    meta = {"BLOCK_V": block, "ALIGN": align}
    return KernelLaunch(kernel, (B * T,), (*args, options.ignore_index), meta, warps, logits3.device)


def _forward_launch(
    logits3: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor, options: _Options
) -> KernelLaunch:
    """The forward kernel's launch for ``logits3 [B, T, V]`` (any strides) and ``labels [B*T]`` (int32/int64)."""
    from fastdpo.kernels.logprobs import logprobs_fwd_kernel

    base, offset = aligned_base(logits3)
    args = (base, offset, labels, lse, logp, *logits3.shape[1:], *logits3.stride())
    return _row_launch(logprobs_fwd_kernel, logits3, args, _vector(logits3), options)


def _triton_forward(
    logits3: torch.Tensor, labels: torch.Tensor, options: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits3 [B, T, V]`` (any strides), ``labels [B*T]`` int64 -> ``(lse [B*T] fp32, logp [B*T] fp32)``."""
    n = logits3.shape[0] * logits3.shape[1]
    lse = torch.empty(n, dtype=torch.float32, device=logits3.device)
    logp = torch.empty(n, dtype=torch.float32, device=logits3.device)
    launch(_forward_launch(logits3, labels, lse, logp, options))
    return lse, logp


class _Saved(NamedTuple):
    """What the forward keeps for the backward: ``logits3 [B, T, V]`` (any strides), ``labels [B*T]`` (int64; int32
    too for the kernel) and ``lse [B*T]`` (fp32; fp64 for fp64 logits on the torch path)."""

    logits3: torch.Tensor
    labels: torch.Tensor
    lse: torch.Tensor


def _backward_launch(saved: _Saved, grad_logp: torch.Tensor, grad3: torch.Tensor, options: _Options) -> KernelLaunch:
    """The backward kernel's launch writing ``grad_logp [B*T]`` times d logp / d logits into ``grad3 [B, T, V]`` (may
    be ``saved.logits3``)."""
    from fastdpo.kernels.logprobs import logprobs_bwd_kernel

    logits3, labels, lse = saved
    (base, offset), (gbase, goffset) = aligned_base(logits3), aligned_base(grad3)
    strides = (*logits3.stride(), *grad3.stride())
    args = (base, offset, labels, lse, grad_logp, gbase, goffset, *logits3.shape[1:], *strides)
    return _row_launch(logprobs_bwd_kernel, logits3, args, min(_vector(logits3), _vector(grad3)), options)


# ---------------------------------------------------------------------------------------------------------------
# Torch path (chunked over rows)
# ---------------------------------------------------------------------------------------------------------------


def _row_chunks(tensors: tuple[torch.Tensor, ...], rows: int) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """Walk same-shaped ``[B, T, V]`` tensors in row chunks: yield ``(first_row, ([r, V] view of each))``.

    Views only, never copies: when some tensor's rows are not evenly strided across batch entries (e.g. the slice
    ``logits[:, :-1]``), chunks stay inside one batch entry.
    """
    B, T, V = tensors[0].shape
    try:
        flats = tuple(t.view(B * T, V) for t in tensors)
    except RuntimeError:
        for b in range(B):
            for t0 in range(0, T, rows):
                yield b * T + t0, tuple(t[b, t0 : t0 + rows] for t in tensors)
        return
    for r0 in range(0, B * T, rows):
        yield r0, tuple(f[r0 : r0 + rows] for f in flats)


def _torch_forward(logits3: torch.Tensor, labels: torch.Tensor, options: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`_triton_forward`; float64 logits give float64 outputs.

    A label that is neither ``ignore_index`` nor in ``[0, V)`` (possible with ``validate=False``) gives NaN and is
    never used as an index.
    """
    B, T, V = logits3.shape
    acc = accumulate_dtype(logits3.dtype)
    lse = torch.empty(B * T, dtype=acc, device=logits3.device)
    logp = torch.empty(B * T, dtype=acc, device=logits3.device)
    for r0, (chunk,) in _row_chunks((logits3,), _chunk_rows(V, options.chunk_rows)):
        r1 = r0 + chunk.shape[0]
        lbl = labels[r0:r1]
        valid = lbl != options.ignore_index
        in_vocab = (lbl >= 0) & (lbl < V)
        x = chunk.to(acc)  # the chunk's fp32 temporary
        row_lse = torch.logsumexp(x, dim=-1)
        target = x.gather(1, torch.where(in_vocab, lbl, 0).unsqueeze(1)).squeeze(1)
        lse[r0:r1] = row_lse
        logp[r0:r1] = torch.where(valid, torch.where(in_vocab, target - row_lse, float("nan")), 0.0)
    return lse, logp


def _torch_backward(saved: _Saved, grad_logp: torch.Tensor, grad3: torch.Tensor, options: _Options) -> None:
    """Same contract as the :func:`_backward_launch` kernel: write ``grad_logp[r] * (onehot - softmax)`` of every
    row into ``grad3 [B, T, V]`` (may be ``saved.logits3``: each chunk is read, then written).

    Rows of ignored or out-of-vocabulary labels get exactly zero gradient.
    """
    logits3, labels, lse = saved
    V = logits3.shape[2]
    scored = (labels != options.ignore_index) & (labels >= 0) & (labels < V)
    g_all = torch.where(scored, grad_logp.to(lse.dtype), 0.0)
    safe_labels = torch.where(scored, labels, 0)
    for r0, (chunk, dest) in _row_chunks((logits3, grad3), _chunk_rows(V, options.chunk_rows)):
        r1 = r0 + chunk.shape[0]
        g = g_all[r0:r1].unsqueeze(1)
        # d = g * (onehot - exp(x - lse)), with one accumulate-dtype temporary per chunk (x - lse promotes to it).
        d = chunk - lse[r0:r1].unsqueeze(1)
        d.exp_().mul_(-g)
        d.scatter_add_(1, safe_labels[r0:r1].unsqueeze(1), g)
        dest.copy_(d)


# ---------------------------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------------------------


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """``[N, V] -> [1, N, V]`` view; ``[B, T, V]`` unchanged."""
    return t.unsqueeze(0) if t.dim() == 2 else t


class _TokenLogprobs(torch.autograd.Function):
    """``logits [N, V] or [B, T, V]`` (any strides), ``labels [N or B*T]`` int64 -> ``logp [N or B*T]`` fp32.

    Saved for backward: the logits (by reference, no copy), the labels and the per-token logsumexp — O(N) besides
    the logits. Every backward through one graph gives the same gradient, except with ``inplace_backward``: the
    first backward then turns the logits into their gradient, and a second one is refused with a clear error.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, labels: torch.Tensor, options: _Options
    ) -> torch.Tensor:
        logits3 = _as_3d(logits)
        forward = _triton_forward if options.backend == "triton" else _torch_forward
        lse, logp = forward(logits3, labels, options)
        ctx.save_for_backward(logits, labels, lse)
        ctx.options = options
        ctx.logits_clobbered = False
        return logp

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_logp: torch.Tensor):  # type: ignore[override]
        refuse_double_backward("token_logprobs / sequence_logprobs")
        if ctx.logits_clobbered:  # checked before unpacking: the saved logits fail autograd's version check now
            raise RuntimeError(
                "a second backward through token_logprobs / sequence_logprobs with inplace_backward=True: the first "
                "backward overwrote the logits with their gradient, so they cannot be read again. Pass "
                "inplace_backward=False (and retain_graph=True) to backward more than once through one graph "
                "(several losses sharing one forward, torch.autograd.grad per output)."
            )
        logits, labels, lse = ctx.saved_tensors
        options: _Options = ctx.options
        grad_logits = None
        if ctx.needs_input_grad[0]:
            ctx.logits_clobbered = options.inplace_backward
            grad_logits = (
                logits
                if options.inplace_backward
                else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            )
            saved, grad3 = _Saved(_as_3d(logits), labels, lse), _as_3d(grad_logits)
            grad_logp = grad_logp.contiguous()
            if options.backend == "triton":
                launch(_backward_launch(saved, grad_logp, grad3, options))
                if options.inplace_backward:  # the kernel wrote behind autograd's back: later reads of old values fail
                    torch.autograd.graph.increment_version(logits)
            else:
                _torch_backward(saved, grad_logp, grad3, options)
        return grad_logits, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _prepare(logits: torch.Tensor, labels: torch.Tensor, options: _Options) -> _Options:
    """Check inputs and options (before any launch); the options with the concrete backend."""
    check_float("logits", logits)
    check_index("labels", labels)
    check_int("ignore_index", options.ignore_index)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., V], got {list(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of logits without the vocabulary dim: logits {list(logits.shape)} "
            f"needs labels {list(logits.shape[:-1])}, got {list(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError(f"empty batch: logits has shape {list(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if options.inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor (its .grad would alias its data); pass logits "
            "produced by an op (e.g. the lm head's matmul) or use inplace_backward=False"
        )
    if options.validate:
        check_labels(labels, logits.shape[-1], options.ignore_index)
    chosen = resolve_backend(options.backend, logits.device)
    if logits.dtype == torch.float64:  # the kernels reduce in fp32
        chosen = "torch"
    return options._replace(backend=chosen)


def _token_logprobs_flat(logits: torch.Tensor, labels: torch.Tensor, options: _Options) -> torch.Tensor:
    """Checked inputs and prepared options -> per-token log-probs ``[labels.numel()]``."""
    if logits.dim() > 3:  # [..., T, V] -> [-1, T, V] (a view whenever strides allow)
        logits = logits.reshape(-1, *logits.shape[-2:])
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    return _TokenLogprobs.apply(logits, flat_labels, options)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: Backend = "auto",
    block_v: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(logits)[..., labels]``.

    Args:
        logits: ``[..., V]`` float16/bfloat16/float32/float64 (float64 always takes the torch path), any strides.
        labels: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value of positions that are not scored (log-prob 0, zero gradient).
        inplace_backward: write the logits gradient into the logits buffer itself (saves one ``[.., V]`` tensor).
            The logits are then CLOBBERED by the backward pass; only allow it when nothing else reads them later (a
            second backward through the same graph raises).
        validate: ``True`` checks that every label is ``ignore_index`` or in ``[0, V)`` before any kernel runs
            (``ValueError``; one device sync) and warns (``RuntimeWarning``) when a result is NaN/inf (another
            sync). ``False`` skips both for hot loops; a label outside the vocabulary then gives a NaN log-prob
            (never an out-of-bounds read) and a zero gradient row.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :mod:`fastdpo._dispatch`).
        block_v: Triton columns per loop step (power of two; default ``min(4096, next_pow2(V))``).
        chunk_rows: torch-path rows per chunk (default: ``16Mi / V``).

    Returns:
        float32 (float64 for float64 logits) of ``labels.shape``; 0 at ignored positions; differentiable wrt logits.
    """
    options = _prepare(logits, labels, _Options(ignore_index, inplace_backward, validate, backend, block_v, chunk_rows))
    tok = _token_logprobs_flat(logits, labels, options)
    if validate:
        warn_nonfinite_output(tok, "logits")
    return tok.view(labels.shape)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    **token_options: Unpack[TokenLogprobsKeywords],
) -> torch.Tensor:
    """Per-sequence sums (or means) of label log-probabilities, without materializing ``log_softmax``.

    Two layouts:
    - padded: ``logits [B, T, V]`` aligned with ``labels [B, T]`` (``logits[b, t]`` scores ``labels[b, t]``; shift
      before calling) -> ``[B]``;
    - packed: ``logits [N, V]``, ``labels [N]``, ``segment_ids [N]`` in ``[0, S)`` -> ``[S]`` (``S = num_segments``,
      default ``max(segment_ids) + 1``). Segment sums are deterministic (no atomics).

    Args:
        average: divide each sum by its count of non-ignored tokens (clamped to >= 1).
        segment_ids, num_segments: packed layout; ``num_segments`` without ``segment_ids`` is an error, and
            ``num_segments=None`` is refused when ``max(segment_ids) + 1`` exceeds ``N`` (pass it explicitly).
        token_options: the keywords of :func:`token_logprobs` (``ignore_index``, ``inplace_backward``, ``validate``,
            ``backend``, ``block_v``, ``chunk_rows``; any other keyword is a ``TypeError``). ``inplace_backward=True``
            clobbers the logits during backward. ``validate`` also checks that every segment id lies in ``[0, S)``;
            with ``validate=False`` a token whose segment id lies outside adds to no sequence, and a NaN log-prob (an
            out-of-vocabulary label) propagates to its sequence's sum.

    Returns:
        ``[B]`` or ``[S]`` float32 (float64 for float64 logits), differentiable wrt ``logits``. Sequences with no
        scored token give 0 and zero gradient.
    """
    options = _Options.of("sequence_logprobs", token_options)
    if segment_ids is None:
        if isinstance(logits, torch.Tensor) and logits.dim() != 3:
            raise ValueError(f"logits must be [B, T, V] (or [N, V] with segment_ids), got shape {list(logits.shape)}")
    elif isinstance(logits, torch.Tensor) and logits.dim() != 2:
        raise ValueError(f"with segment_ids, logits must be [N, V], got shape {list(logits.shape)}")
    options = _prepare(logits, labels, options)
    if segment_ids is not None:
        check_index("segment_ids", segment_ids)
        check_same_device(logits=logits, segment_ids=segment_ids)
        num_segments = check_segments(segment_ids, labels.shape[0], num_segments, validate=options.validate)
    elif num_segments is not None:
        raise ValueError("num_segments is only meaningful together with segment_ids")

    tok = _token_logprobs_flat(logits, labels, options)
    valid = labels != options.ignore_index
    if segment_ids is None:
        out = tok.view(labels.shape).sum(dim=1)  # per-row sums: deterministic, fp32
        if average:
            out = out / valid.sum(dim=1).clamp(min=1).to(out.dtype)
    else:
        out = segment_sum(tok, segment_ids, num_segments, validate=False, backend=options.backend)
        if average:
            counts = segment_counts(segment_ids[valid], num_segments)
            out = out / counts.clamp(min=1).to(out.dtype)
    if options.validate:
        warn_nonfinite_output(out, "logits")
    return out
