"""Fused LM head: token / sequence log-probabilities straight from hidden states, never materializing ``[N, V]``.

Logit definition (matches HF models incl. Gemma 2)::

    x = hidden @ weight.T + bias                # the vendor GEMM, tile by tile
    z = x * logit_scale
    z = softcap * tanh(z / softcap)             # when softcap is given
    z = z / temperature
    logprob = z[label] - logsumexp(z)

Only positions whose label is not ``ignore_index`` are projected (they are compacted first). The work is tiled over
tokens x vocabulary: each tile is one ``torch.mm`` into a bounded, reused buffer, then folded into per-token running
state (online logsumexp, target logit, optional statistics) by the Triton kernel ``fastdpo.kernels.linear_fold`` on
GPU or by the equivalent in-place torch ops elsewhere. The backward recomputes each tile (apart from the first tiles
kept from the forward within ``keep_logits_bytes``), turns it into the logit gradient in place
(``g * (onehot - softmax)`` times the chain rule through temperature / softcap / scale) and accumulates
``grad_hidden`` and ``grad_weight`` in fp32 with two more GEMMs, deterministically (fixed tile order, no atomics).

Saved for backward (all through ``save_for_backward``, so saved-tensor hooks see everything): the compacted hidden
states (the input itself when nothing is masked), the weight, labels and ``lse`` (``O(N)``, float64), plus at most
``keep_logits_bytes`` of logits tiles (default 176 MiB) whose recompute the backward then skips; nothing else grows
with ``V``. Under ``torch.no_grad()`` / ``inference_mode`` or when nothing requires grad nothing is saved at all.
Kept tiles are only an optimisation: the first backward overwrites them, and any later backward through the same
graph (``retain_graph=True``, several losses on one forward, ``torch.autograd.grad`` per output) recomputes them,
so every backward gives the same gradients. Double backward (``create_graph=True``) raises.

Torch path details (the CPU hot path): without a softcap, ``logit_scale / temperature`` is folded into the ``[N, D]``
hidden states and the bias, so tiles hold final logits; the log-probs-only forward folds a tile with one fused
``log_softmax`` (row-cache resident) instead of max / sub / exp / sum passes, keeping the running lse in float64;
the backward forms ``E' = exp(z - hi) - onehot / r`` in two in-place passes (``lse = hi + log(1/r)`` split so that
``z - hi`` is exact near the maximum, as naive ``z - max``) and moves the row factor ``-g * r`` onto the ``[N, D]``
GEMM operands.
Tiles are ~16 MB (all tokens up to 4096 x ~2048 vocabulary columns): few, large element-wise ops.

A vocabulary tile whose logits are all -inf (a padded vocabulary masked through the bias) is legal: the fold shifts
by 0 while a row has seen only -inf, and such columns get exactly zero gradient. With ``validate=False`` a label
outside ``[0, V)`` gives a NaN log-prob and a zero gradient row (it never indexes a tile).

Statistics (entropy, ``log sum p^2``, vocabulary-mean logit, top-1 hit) are returned without gradient (TRL's entropy
is differentiable; here it is a metric only). float64 inputs always use the torch path and return float64 log-probs.

Distributed weights: an FSDP2 ``DTensor`` weight is gathered once per call with ``full_tensor()`` (autograd returns
its gradient to the DTensor's placement); a ZeRO-3 partitioned weight is gathered by ``gather_context``, entered
around the forward and again around the backward sweep.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fastdpo._dispatch import Backend, resolve_backend
from fastdpo._launch import KernelLaunch, launch
from fastdpo._validation import (
    check_float,
    check_index,
    check_labels,
    check_same_device,
    refuse_double_backward,
    warn_nonfinite_output,
)
from fastdpo.segments import check_segments, segment_counts, segment_sum

__all__ = [
    "DEFAULT_KEEP_LOGITS_BYTES",
    "SegmentStats",
    "TokenStats",
    "linear_logprobs_loss_grad_in_forward",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "naive_linear_token_logprobs",
]

#: Raw logits kept from the forward for the backward (skips that part of the recompute GEMM). Bounded, so the
#: saved state stays O(N) + this constant.
DEFAULT_KEEP_LOGITS_BYTES = 176 * 2**20
#: Logits buffer of one chunk of groups in grad-in-forward mode (the whole chunk's logits stay between the two passes).
DEFAULT_GIF_LOGITS_BYTES = 256 * 2**20
#: The log-probs-only fold takes a row's tile logsumexp from column 0 while log_softmax(z)_0 >= -limit (error
#: ~ulp(limit) ~ 1e-6) and from the row's maximum otherwise (two more reductions).
_LSE_COL0_LIMIT = 16.0

GatherContext = Callable[[], contextlib.AbstractContextManager[Any]]


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`linear_token_logprobs` (each shaped like ``labels``; 0 / False where ignored).

    ``logprobs`` fp32, differentiable wrt hidden, weight and bias. ``entropy`` (fp32, ``-sum p log p``),
    ``log_sum_p2`` (fp32, ``log sum p^2``, WPO), ``mean_logit`` (fp32, mean of z over the vocabulary) and
    ``argmax_hit`` (bool, ``argmax z == label``, first maximum wins ties) are ``None`` unless requested and carry no
    gradient.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    argmax_hit: torch.Tensor | None = None


class _Spec(NamedTuple):
    """Logit transform and tiling of one call."""

    scale: float
    softcap: float | None
    temperature: float
    token_chunk: int
    vocab_chunk: int
    backend: str

    @property
    def has_transform(self) -> bool:
        return self.scale != 1.0 or self.softcap is not None or self.temperature != 1.0

    def kernel_consts(self) -> tuple[float, float, float]:
        """``(scale, inv_softcap, out_mult)`` as the Triton kernels take them."""
        if self.softcap is not None:
            return self.scale, 1.0 / self.softcap, self.softcap / self.temperature
        return self.scale, 1.0, 1.0 / self.temperature


# ----------------------------------------------------------------------------------------------------------------
# validation and planning
# ----------------------------------------------------------------------------------------------------------------


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


def _plan(
    n: int, vocab: int, device: torch.device, chunk_size: int | tuple[int, int] | None, backend: str
) -> tuple[int, int]:
    """Tile shape ``(tokens, vocab)``.

    CPU: the whole token set (up to 4096 rows) against ~16 MB of vocabulary columns per tile. GPU: big tiles (up to 8192 x 8192, at most
    ~256 MB of fp32) so each GEMM saturates the device.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
            tok, voc = None, chunk_size
        elif (
            isinstance(chunk_size, tuple)
            and len(chunk_size) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) for c in chunk_size)
        ):
            tok, voc = chunk_size
        else:
            raise TypeError(f"chunk_size must be an int (vocab tile) or a (tokens, vocab) tuple, got {chunk_size!r}")
        if voc < 1 or (tok is not None and tok < 1):
            raise ValueError(f"chunk_size entries must be >= 1, got {chunk_size!r}")
        tok = tok if tok is not None else _default_token_chunk(device)
        return max(1, min(tok, max(n, 1))), min(voc, vocab)
    tok = min(max(n, 1), _default_token_chunk(device))
    if device.type == "cuda":
        voc = max(1024, min(8192, (64 * 2**20) // max(tok, 1)))
    else:
        # ~16 MB fp32 tiles: few, large element-wise ops (each one is a parallel region; on a shared 2-core CPU
        # per-op synchronisation dominates small tiles) while the GEMMs keep full efficiency.
        voc = max(256, min(4096, (4 * 2**20) // max(tok, 1) // 256 * 256))
    return tok, min(voc, vocab)


def _default_token_chunk(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 4096


def _resolve(backend: Backend, hidden: torch.Tensor) -> str:
    """Concrete backend; float64 always takes the torch path (the kernels fold in fp32)."""
    resolved = resolve_backend(backend, hidden.device)
    return "torch" if hidden.dtype == torch.float64 else resolved


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


# ----------------------------------------------------------------------------------------------------------------
# tile primitives
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _project_tile(
    h: torch.Tensor, w_tile: torch.Tensor, b_tile: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """``h @ w_tile.T + b_tile`` as an fp32 (fp64 for fp64 inputs) tile, written into ``out`` when given.

    Same-precision inputs go straight to the GEMM (``out=``); half inputs use the fp32-output GEMM on CUDA (straight
    into ``out``, no extra tile) and are up-cast on CPU (no fast half GEMM there).
    """
    acc = _compute_dtype(h)
    if h.dtype == acc and w_tile.dtype == acc:
        if b_tile is None:
            return torch.mm(h, w_tile.t(), out=out) if out is not None else torch.mm(h, w_tile.t())
        b = b_tile.to(acc)
        return torch.addmm(b, h, w_tile.t(), out=out) if out is not None else torch.addmm(b, h, w_tile.t())
    if h.device.type == "cuda" and h.dtype == w_tile.dtype:
        if out is not None:
            x = torch.mm(h, w_tile.t(), out_dtype=acc, out=out)
        else:
            x = torch.mm(h, w_tile.t(), out_dtype=acc)
    elif out is not None:
        x = torch.mm(h.to(acc), w_tile.t().to(acc), out=out)
    else:
        x = torch.mm(h.to(acc), w_tile.t().to(acc))
    if b_tile is not None:
        x.add_(b_tile.to(acc))
    return x


def _transform_into(x: torch.Tensor, spec: _Spec, out: torch.Tensor) -> torch.Tensor:
    """``out = transform(x)`` (see the module docstring)."""
    if spec.softcap is not None:
        torch.mul(x, spec.scale / spec.softcap, out=out)
        out.tanh_()
        out.mul_(spec.softcap / spec.temperature)
    else:
        torch.mul(x, spec.scale / spec.temperature, out=out)
    return out


class _Fold:
    """Per-token running state of the forward fold (``[n]`` fp32; ``aidx`` int64).

    ``m`` running max and ``s = sum exp(z - m)`` (Triton kernels, and the torch stats/argmax fold), or ``run_lse``
    (float64 logsumexp so far; the torch log-probs-only fold). :meth:`lse` is float64 either way: the fp32 value of an
    lse of ~1e4 is off by up to ulp/2 ~ 1e-3, which would be the relative error of every softmax value in the
    backward (naive ``log_softmax`` never forms it).
    """

    def __init__(
        self, n: int, device: torch.device, stats: bool, argmax: bool, dtype: torch.dtype, run_lse: bool
    ) -> None:
        self.run_lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=device) if run_lse else None
        self.m = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.target = torch.zeros(n, dtype=dtype, device=device)
        self.stats = stats
        self.argmax = argmax
        if stats:
            self.t = torch.zeros(n, dtype=dtype, device=device)
            self.s2 = torch.zeros(n, dtype=dtype, device=device)
            self.zsum = torch.zeros(n, dtype=dtype, device=device)
        if argmax:
            self.amax = torch.full((n,), float("-inf"), dtype=dtype, device=device)
            self.aidx = torch.zeros(n, dtype=torch.int64, device=device)

    def lse(self) -> torch.Tensor:
        """``[n]`` float64 logsumexp (an exact fp32 max plus a small log)."""
        if self.run_lse is not None:
            return self.run_lse
        return self.m.double() + self.s.double().log()


class _LabelTiles:
    """Which compacted rows have their label inside tile ``(token tile i, vocab tile j)`` (torch path only).

    One stable sort of ``(label tile, token tile)`` keys; tile ``k`` owns ``order[off[k]:off[k+1]]``. A label
    outside ``[0, vocab)`` (unvalidated input) belongs to no tile: its row never indexes a tile.
    """

    def __init__(self, labels: torch.Tensor, n: int, tok: int, voc: int, vocab: int) -> None:
        n_tok_tiles = max(1, -(-n // tok))
        n_tiles = -(-vocab // voc) * n_tok_tiles
        lab = labels.to(torch.int64)
        rows = torch.arange(n, device=labels.device)
        key = (lab // voc) * n_tok_tiles + rows // tok
        key = torch.where(_out_of_vocab(lab, vocab), n_tiles, key)  # sorts last, inside no tile's range
        self.order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=n_tiles + 1)[:n_tiles]
        self.offsets = [0] + torch.cumsum(counts, 0).tolist()
        self.labels = lab
        self.n_tok_tiles = n_tok_tiles

    def get(self, ti: int, vj: int, n0: int, v0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(global rows, local rows, local cols)`` or ``None`` when no label falls in the tile."""
        k = vj * self.n_tok_tiles + ti
        lo, hi = self.offsets[k], self.offsets[k + 1]
        if lo == hi:
            return None
        rows = self.order[lo:hi]
        return rows, rows - n0, self.labels[rows] - v0


def _out_of_vocab(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[n]`` bool: compacted labels outside ``[0, vocab)`` (only possible with ``validate=False``). Such a token
    gets a NaN log-prob and a zero gradient row, on both backends."""
    return (labels < 0) | (labels >= vocab)


def _tiles(n: int, vocab: int, tok: int, voc: int):
    """Vocabulary tiles outer, token tiles inner (a weight tile is reused across all token tiles)."""
    for vj, v0 in enumerate(range(0, vocab, voc)):
        v1 = min(v0 + voc, vocab)
        for ti, n0 in enumerate(range(0, n, tok)):
            yield ti, vj, n0, min(n0 + tok, n), v0, v1


def _fold_tile_torch(
    x: torch.Tensor,
    st: _Fold,
    n0: int,
    n1: int,
    hits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    v0: int,
    spec: _Spec,
    tile_is_z: bool,
    may_clobber: bool,
    scratch: torch.Tensor | None,
    scratch2: torch.Tensor | None,
) -> None:
    """Fold tile ``x`` ``[n1-n0, c]`` into ``st`` (rows ``n0:n1``).

    ``tile_is_z``: ``x`` already holds the transformed logits (scale/temperature folded into the projection);
    otherwise ``x`` is raw and is transformed into ``scratch2``. ``may_clobber``: ``x`` is not kept, so the exp may
    run in place (one tile buffer fewer, no extra write); else ``scratch`` receives it.
    """
    if tile_is_z:
        z = x
    else:
        assert scratch2 is not None
        z = _transform_into(x, spec, scratch2)
    if hits is not None:
        rows, lrows, lcols = hits
        st.target.index_put_((rows,), z[lrows, lcols])
    if st.run_lse is not None:
        # lse only: one fused, row-cache-resident log_softmax pass. lse_tile = z_0 - log_softmax(z)_0 in fp64 carries
        # the rounding of log_softmax(z)_0 = (z_0 - max) - log(sum exp(z - max)): ~ulp(|log_softmax(z)_0|), about
        # naive's own error while column 0 sits within _LSE_COL0_LIMIT of the lse, whatever the logits' magnitude.
        out = scratch if scratch is not None else torch.empty_like(z)
        torch.log_softmax(z, dim=1, out=out)
        out0 = out[:, 0].double()
        lse_tile = z[:, 0].double() - out0
        # other rows (and NaN ones: a row of the tile that is all -inf, or NaN/+inf logits) take the exact form at
        # the row's argmax, where log_softmax(z) = -log(sum ...) rounded once: lse = max z - max log_softmax(z)
        far = (~(out0 >= -_LSE_COL0_LIMIT)).nonzero().squeeze(1)
        if far.numel() * 4 > z.shape[0]:  # mostly far: two reductions over the tile beat gathering most of it
            lse_tile = torch.where(out0 >= -_LSE_COL0_LIMIT, lse_tile, _lse_at_argmax(z, out))
        elif far.numel():
            lse_tile[far] = _lse_at_argmax(z.index_select(0, far), out.index_select(0, far))
        st.run_lse[n0:n1] = torch.logaddexp(st.run_lse[n0:n1], lse_tile)
        return
    m = st.m[n0:n1]
    if st.argmax:
        bmax, bidx = torch.max(z, dim=1)
        better = bmax > st.amax[n0:n1]
        st.aidx[n0:n1] = torch.where(better, bidx + v0, st.aidx[n0:n1])
        st.amax[n0:n1] = torch.where(better, bmax, st.amax[n0:n1])
    else:
        bmax = torch.amax(z, dim=1)
    if st.stats:
        st.zsum[n0:n1] += z.sum(dim=1)  # a -inf logit makes the vocabulary mean -inf, as the naive mean
    m_new = torch.maximum(m, bmax)
    # shift by 0 while a row has seen only -inf logits (a masked vocabulary tile): exp(-inf - -inf) would be NaN
    shift = torch.where(m_new == float("-inf"), 0.0, m_new)
    alpha = torch.exp(m - shift)
    if may_clobber and not st.stats:
        e = z.sub_(shift.unsqueeze(1))
    else:
        assert scratch is not None
        e = torch.sub(z, shift.unsqueeze(1), out=scratch)
    e.exp_()
    st.s[n0:n1] = st.s[n0:n1] * alpha + e.sum(dim=1)
    if st.stats:
        # p log p -> 0 for a -inf logit: clamp it to the lowest finite value so that e * z = 0 * finite (NaN stays
        # NaN). The tile's later readers (a kept tile's backward) get exp(lowest - lse) = 0 exactly as from -inf.
        z.clamp_(min=torch.finfo(z.dtype).min)
        st.t[n0:n1] = st.t[n0:n1] * alpha + torch.linalg.vecdot(e, z, dim=1)
        st.s2[n0:n1] = st.s2[n0:n1] * (alpha * alpha) + torch.linalg.vecdot(e, e, dim=1)
    m.copy_(m_new)


def _lse_at_argmax(z: torch.Tensor, logsm: torch.Tensor) -> torch.Tensor:
    """``[rows]`` float64 ``max z - max log_softmax(z)``: the logsumexp with naive's error; -inf for an all -inf row
    (a masked vocabulary tile, where ``log_softmax`` is NaN), NaN for NaN / +inf logits (as naive)."""
    zmax = torch.amax(z, dim=1).double()
    return torch.where(zmax == float("-inf"), zmax, zmax - torch.amax(logsm, dim=1).double())


def _fold_launch(
    x: torch.Tensor, st: _Fold, n0: int, n1: int, labels: torch.Tensor, v0: int, vocab: int, spec: _Spec
) -> KernelLaunch:
    """The fold kernel's launch for tile ``x [n1-n0, c]`` (fp32, unit column stride) into rows ``n0:n1`` of ``st``."""
    from fastdpo.kernels.linear_fold import linear_fold_kernel

    rows, cols = x.shape
    scale, inv_softcap, out_mult = spec.kernel_consts()
    dummy = st.s
    args = (
        x,
        x.stride(0),
        cols,
        v0,
        vocab,
        labels[n0:n1],
        st.m[n0:n1],
        st.s[n0:n1],
        st.target[n0:n1],
        st.t[n0:n1] if st.stats else dummy,
        st.s2[n0:n1] if st.stats else dummy,
        st.zsum[n0:n1] if st.stats else dummy,
        st.aidx[n0:n1] if st.argmax else labels,
        scale,
        inv_softcap,
        out_mult,
    )
    constexprs = {
        "HAS_SOFTCAP": spec.softcap is not None,
        "STATS": st.stats,
        "ARGMAX": st.argmax,
        "BLOCK_V": min(1024, max(16, _next_pow2(cols))),
        "ALIGN": 16 // x.element_size(),
    }
    return KernelLaunch(linear_fold_kernel, (rows,), args, constexprs, 4, x.device)


def _fold_tile_triton(
    x: torch.Tensor, st: _Fold, n0: int, n1: int, labels: torch.Tensor, v0: int, vocab: int, spec: _Spec
) -> None:
    launch(_fold_launch(x, st, n0, n1, labels, v0, vocab, spec))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _grad_tile_softcap(
    x: torch.Tensor,
    hi: torch.Tensor,
    gc: torch.Tensor,
    r: torch.Tensor,
    hits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    spec: _Spec,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Raw tile ``x`` -> d/dx in place with a softcap: ``gc * (onehot - softmax(z)) * (1 - th^2)``.

    ``th = tanh(scale * x / softcap)``, ``z = softcap / T * th``, ``dz/dx = scale / T * (1 - th^2)`` (the constant
    ``scale / T`` is already in ``gc = g * scale / T``). ``softmax(z) = r * exp(z - hi)`` (see :func:`_lse_split`).
    """
    assert spec.softcap is not None
    th = torch.mul(x, spec.scale / spec.softcap, out=scratch)
    th.tanh_()
    torch.mul(th, spec.softcap / spec.temperature, out=x)
    x.sub_(hi.unsqueeze(1)).exp_()
    th.square_().neg_().add_(1.0)
    x.mul_(th)
    x.mul_((-gc * r).unsqueeze(1))
    if hits is not None:
        _, lrows, lcols = hits
        x.index_put_((lrows, lcols), gc[lrows] * th[lrows, lcols], accumulate=True)
    return x


def _grad_tile_plain(
    z: torch.Tensor,
    hi: torch.Tensor,
    inv_r: torch.Tensor,
    hits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Tile of logits ``z`` -> ``E' = exp(z - hi) - onehot / r`` in place, two passes.

    With ``softmax(z) = r * exp(z - hi)`` (:func:`_lse_split`), ``d/dz = gc * (onehot - softmax) = -gc * r * E'``:
    the per-row factor ``-gc * r`` is applied to the ``[n, D]`` GEMM operands instead of the tile. ``z - hi`` is
    exact where it matters, as ``z - max`` in the naive ``log_softmax``; folding ``log|gc|`` (or the fp32-rounded
    lse) into the shift instead would round at ``ulp(lse)`` (~1e-3 relative error at ``|z| ~ 1e4``).
    """
    z.sub_(hi.unsqueeze(1)).exp_()
    if hits is not None:
        _, lrows, lcols = hits
        z.index_put_((lrows, lcols), -inv_r[lrows], accumulate=True)
    return z


def _lse_split(lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``lse`` -> ``(hi, r)`` in ``acc``: ``hi`` the nearest ``acc`` value, ``r = exp(hi - lse)`` (1 up to
    ``ulp(hi)``), so ``exp(z - lse) = r * exp(z - hi)`` with ``z - hi`` exact near the row's maximum."""
    hi = lse.to(acc)
    return hi, torch.exp(hi.double() - lse).to(acc)


def _grad_launch(
    x: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    hi: torch.Tensor,
    r: torch.Tensor,
    g: torch.Tensor,
    v0: int,
    vocab: int,
    spec: _Spec,
) -> KernelLaunch:
    """The logit-gradient kernel's launch: raw fp32 tile ``x [rows, c]`` -> d loss / d x in ``out`` (``x`` itself, or
    a buffer of the GEMM operand dtype with ``x``'s strides). ``(hi, r)`` is the row's logsumexp split by
    :func:`_lse_split` (fp32 ``[rows]`` each)."""
    from fastdpo.kernels.linear_fold import linear_grad_kernel

    if out.stride() != x.stride() or x.stride(1) != 1:
        raise ValueError(f"the logit-gradient kernel needs out with x's strides and unit column stride, got "
                         f"{out.stride()} and {x.stride()}")
    rows, cols = x.shape
    scale, inv_softcap, out_mult = spec.kernel_consts()
    args = (x, x.stride(0), out, cols, v0, vocab, labels, hi, r, g, scale, inv_softcap, out_mult)
    constexprs = {
        "HAS_SOFTCAP": spec.softcap is not None,
        "BLOCK_V": min(1024, max(16, _next_pow2(cols))),
        "ALIGN": 16 // min(x.element_size(), out.element_size()),
    }
    return KernelLaunch(linear_grad_kernel, (rows,), args, constexprs, 4, x.device)


def _grad_tile_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    hi: torch.Tensor,
    r: torch.Tensor,
    g: torch.Tensor,
    v0: int,
    vocab: int,
    spec: _Spec,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d x of tile ``x`` written straight in ``out_dtype`` (the GEMM operand dtype): in place when that is
    ``x``'s dtype, else into a buffer with ``x``'s strides (same alignment per row: vector loads and stores)."""
    out = x if out_dtype == x.dtype else torch.empty_strided(x.shape, x.stride(), dtype=out_dtype, device=x.device)
    launch(_grad_launch(x, out, labels, hi, r, g, v0, vocab, spec))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the two sweeps
# ----------------------------------------------------------------------------------------------------------------


class _Kept:
    """Raw logits tiles kept from the forward sweep, keyed by ``(token tile, vocab tile)``, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.tiles: dict[tuple[int, int], torch.Tensor] = {}

    def room_for(self, rows: int, cols: int, itemsize: int) -> bool:
        return self.used + rows * cols * itemsize <= self.budget


def _forward_sweep(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    labels: torch.Tensor,
    spec: _Spec,
    stats: bool,
    argmax: bool,
    kept: _Kept | None,
) -> _Fold:
    """One GEMM per tile + fold. ``h`` ``[n, D]`` compacted, ``labels`` ``[n]`` valid ids. Returns the fold state."""
    n, vocab = h.shape[0], w.shape[0]
    acc = _compute_dtype(h)
    triton = spec.backend == "triton"
    st = _Fold(n, h.device, stats, argmax, acc, run_lse=not (triton or stats or argmax))
    if n == 0:
        return st
    tok, voc = spec.token_chunk, spec.vocab_chunk
    hits = None if triton else _LabelTiles(labels, n, tok, voc, vocab)
    h_p, b_p, tile_is_z = _projection_operands(h, b, spec)
    buf = torch.empty(min(tok, n), voc, dtype=acc, device=h.device)
    scratch = torch.empty_like(buf) if not triton else None
    scratch2 = torch.empty_like(buf) if (not triton and not tile_is_z) else None

    def part(t: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
        return None if t is None else t[:rows, :cols]

    for ti, vj, n0, n1, v0, v1 in _tiles(n, vocab, tok, voc):
        rows, cols = n1 - n0, v1 - v0
        is_kept = kept is not None and kept.room_for(rows, cols, buf.element_size())
        if is_kept:
            assert kept is not None
            out = torch.empty(rows, cols, dtype=acc, device=h.device)
            kept.tiles[(ti, vj)] = out
            kept.used += out.numel() * out.element_size()
        else:
            out = buf[:rows, :cols]
        x = _project_tile(h_p[n0:n1], w[v0:v1], None if b_p is None else b_p[v0:v1], out)
        if triton:
            _fold_tile_triton(x, st, n0, n1, labels, v0, vocab, spec)
        else:
            assert hits is not None
            _fold_tile_torch(
                x,
                st,
                n0,
                n1,
                hits.get(ti, vj, n0, v0),
                v0,
                spec,
                tile_is_z,
                not is_kept,
                part(scratch, rows, cols),
                part(scratch2, rows, cols),
            )
    return st


def _backward_sweep(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    spec: _Spec,
    kept: _Kept | None,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    grad_w: torch.Tensor | None = None,
    grad_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Recompute (or reuse kept) tiles, form d/dx in place, accumulate grads in fp32 (fp64 for fp64 inputs).

    ``lse`` ``[n]`` float64 (:meth:`_Fold.lse`). ``g`` ``[n]`` is d loss / d logprob per compacted token (ignored
    for out-of-vocabulary labels: zero gradient row). ``kept`` tiles are consumed (overwritten); ``None`` recomputes
    every tile. ``grad_w`` / ``grad_b`` may be passed in to accumulate into (grad-in-forward sums over chunks);
    otherwise they are allocated here. Every row of a fresh ``grad_w`` is written exactly once by its first token
    tile's GEMM (``out=``) and accumulated by the others.
    """
    n, vocab = h.shape[0], w.shape[0]
    acc = _compute_dtype(h)
    fresh_w = grad_w is None
    grad_h = torch.zeros(n, h.shape[1], dtype=acc, device=h.device) if need_h else None
    if need_w and grad_w is None:
        grad_w = (
            torch.empty(vocab, w.shape[1], dtype=acc, device=w.device)
            if n > 0
            else torch.zeros(vocab, w.shape[1], dtype=acc, device=w.device)
        )
    if need_b and grad_b is None:
        grad_b = torch.zeros(vocab, dtype=acc, device=h.device)
    if n == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    tok, voc = spec.token_chunk, spec.vocab_chunk
    triton = spec.backend == "triton"
    hits = None if triton else _LabelTiles(labels, n, tok, voc, vocab)
    h_p, b_p, tile_is_z = _projection_operands(h, b, spec)
    h_acc = h if (h.dtype == acc or h.device.type == "cuda") else h.to(acc)
    g = torch.where(_out_of_vocab(labels, vocab), 0.0, g.to(acc))
    gemm_dtype = _gemm_dtype(w, acc)
    row_scale: torch.Tensor | None = None  # per-row factor carried by the [n, D] GEMM operands
    tile_scale: torch.Tensor | None = None  # per-row factor applied to the tile before it is rounded
    hi, r = _lse_split(lse, acc)
    gc = g.contiguous() if triton else g * (spec.scale / spec.temperature)
    if not triton and tile_is_z:
        # d/dx = -gc * r * E' (see _grad_tile_plain). In full precision the row factor moves onto the [n, D]
        # operands; a half-precision GEMM operand must be the rounded gradient itself (the contract of _mm_acc), so
        # there the tile is scaled before it is rounded.
        inv_r = 1.0 / r
        if gemm_dtype == acc:
            row_scale = -gc * r
        else:
            tile_scale = (-gc * r).unsqueeze(1)
    h_w = h_acc if row_scale is None else h_acc * row_scale.unsqueeze(1)
    full = (min(tok, n), voc)
    # a consumed full-size kept tile becomes the recompute buffer (one tile less at the backward's peak)
    buf: torch.Tensor | None = None
    scratch = torch.empty(full, dtype=acc, device=h.device) if (not triton and not tile_is_z) else None
    for ti, vj, n0, n1, v0, v1 in _tiles(n, vocab, tok, voc):
        rows, cols = n1 - n0, v1 - v0
        x = kept.tiles.pop((ti, vj), None) if kept is not None else None
        if x is None:
            if buf is None:
                buf = torch.empty(full, dtype=acc, device=h.device)
            x = _project_tile(h_p[n0:n1], w[v0:v1], None if b_p is None else b_p[v0:v1], buf[:rows, :cols])
        elif buf is None and tuple(x.shape) == full:
            buf = x
        if triton:
            G = _grad_tile_triton(
                x, labels[n0:n1], hi[n0:n1], r[n0:n1], gc[n0:n1], v0, vocab, spec, gemm_dtype
            )
        elif tile_is_z:
            G = _grad_tile_plain(x, hi[n0:n1], inv_r[n0:n1], hits.get(ti, vj, n0, v0))  # type: ignore[union-attr]
            if tile_scale is not None:
                G.mul_(tile_scale[n0:n1])
        else:
            assert hits is not None and scratch is not None
            G = _grad_tile_softcap(
                x, hi[n0:n1], gc[n0:n1], r[n0:n1], hits.get(ti, vj, n0, v0), spec, scratch[:rows, :cols]
            )
        G = G.to(gemm_dtype)  # the precision contract of the half-precision head: see _mm_acc
        if need_b:
            assert grad_b is not None
            if row_scale is None:
                grad_b[v0:v1] += G.sum(dim=0, dtype=acc)
            else:
                grad_b[v0:v1] += torch.mv(G.t().to(acc), row_scale[n0:n1])
        w_tile = w[v0:v1]
        if need_h:
            assert grad_h is not None
            if w_tile.dtype == acc:
                grad_h[n0:n1].addmm_(G, w_tile)
            else:
                grad_h[n0:n1].add_(_mm_acc(G, w_tile, acc))
        if need_w:
            assert grad_w is not None
            dst = grad_w[v0:v1]
            if h_w.dtype == acc and G.dtype == acc:
                if fresh_w and ti == 0:
                    torch.mm(G.t(), h_w[n0:n1], out=dst)
                else:
                    dst.addmm_(G.t(), h_w[n0:n1])
            else:
                part = _mm_acc(G.t(), h_w[n0:n1], acc)
                if fresh_w and ti == 0:
                    dst.copy_(part)
                else:
                    dst.add_(part)
    if grad_h is not None and row_scale is not None:
        grad_h.mul_(row_scale.unsqueeze(1))
    return grad_h, grad_w, grad_b


def _projection_operands(
    h: torch.Tensor, b: torch.Tensor | None, spec: _Spec
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(h_p, b_p, tile_is_z)`` for the projection GEMM.

    Torch path without softcap: ``scale / temperature`` is folded into ``[n, D]`` hidden and the bias, so every tile
    directly holds the final logits ``z`` (no transform pass). Otherwise (softcap, or the Triton kernels, which apply
    the transform themselves) tiles hold the raw projection. Half inputs on CPU are up-cast once here.
    """
    acc = _compute_dtype(h)
    if h.device.type != "cuda" and h.dtype != acc:
        h = h.to(acc)
    if spec.backend == "triton" or spec.softcap is not None:
        return h, b, False
    c = spec.scale / spec.temperature
    if c == 1.0:
        return h, b, True
    return h * c, None if b is None else b.to(acc) * c, True


def _gemm_dtype(w: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """dtype of the logit-gradient tile as a GEMM operand: the weight's when it is half precision, else ``acc``."""
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else acc


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated in ``acc`` (fp32) for half-precision operands, one behaviour on every device.

    Precision contract of the half-precision head's backward: the logit-gradient tile is rounded to the weight's
    dtype before the two GEMMs (as in every peer: the autograd of a bf16 ``hidden @ weight.T``), the products are
    exact in fp32 (a product of two half values fits fp32's mantissa) and accumulate in fp32, and the gradients of
    hidden, weight and bias accumulate in fp32 across tiles. CUDA runs the half GEMM with an fp32 output
    (``out_dtype``, torch >= 2.8, no up-cast copies); elsewhere the operands are up-cast exactly and the fp32 GEMM
    computes the same sums (CPU has no ``out_dtype`` GEMM).
    """
    if a.device.type == "cuda" and a.dtype == b.dtype and a.dtype != acc:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


def _outputs_from_fold(st: _Fold, labels: torch.Tensor, vocab: int):
    """``(lse [n] float64, logp, entropy, log_sum_p2, mean_logit, hit)``, the others in the fold's dtype."""
    lse = st.lse()
    acc = st.target.dtype
    logp = torch.where(_out_of_vocab(labels, vocab), float("nan"), st.target.double() - lse).to(acc)
    entropy = log_sum_p2 = mean_logit = hit = None
    if st.stats:
        entropy = (lse - (st.t / st.s).double()).to(acc)
        log_sum_p2 = st.s2.log() - 2.0 * st.s.log()
        mean_logit = st.zsum / vocab
    if st.argmax:
        hit = st.aidx == labels
    return lse, logp, entropy, log_sum_p2, mean_logit, hit


class _LinearLogprobs(torch.autograd.Function):
    """The fused head's autograd node.

    Kept logits tiles are an optimisation only: the first backward overwrites them (they become gradient tiles and
    the recompute buffer) and records that it did; any later backward through the same graph (``retain_graph=True``,
    several losses sharing one forward, ``torch.autograd.grad`` per output) recomputes every tile from the saved
    hidden states and weight, so every backward gives the same, correct gradients on both backends, at no extra
    memory in the ordinary single backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        labels: torch.Tensor,
        spec: _Spec,
        stats: bool,
        argmax: bool,
        keep_bytes: int,
        gather_context: GatherContext | None,
    ):
        kept = _Kept(keep_bytes)
        st = _forward_sweep(h, w, b, labels, spec, stats, argmax, kept)
        lse, logp, entropy, log_sum_p2, mean_logit, hit = _outputs_from_fold(st, labels, w.shape[0])
        ctx.spec = spec
        ctx.gather_context = gather_context
        ctx.has_bias = b is not None
        # kept logits tiles go through save_for_backward too, so saved-tensor hooks see (and may offload) them
        ctx.kept_keys = list(kept.tiles)
        kept_tiles = [kept.tiles[k] for k in ctx.kept_keys]
        ctx.kept_budget = kept.budget
        ctx.kept_consumed = False
        if gather_context is not None:
            # ZeRO-3: the parameter's storage is only valid inside the context; keep the parameter itself.
            ctx.w_param, ctx.b_param = w, b
            ctx.save_for_backward(h, labels, lse, *kept_tiles)
        else:
            ctx.save_for_backward(h, labels, lse, *kept_tiles, w, b)
        outs = [logp]
        for o in (entropy, log_sum_p2, mean_logit, hit):
            if o is not None:
                ctx.mark_non_differentiable(o)
                outs.append(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *unused: torch.Tensor):  # type: ignore[override]
        refuse_double_backward("the fused LM head (linear_token_logprobs / linear_sequence_logprobs)")
        saved = ctx.saved_tensors
        h, labels, lse = saved[:3]
        nk = len(ctx.kept_keys)
        kept = None
        if not ctx.kept_consumed:
            ctx.kept_consumed = True  # set first: a backward interrupted half-way leaves tiles half-overwritten
            kept = _Kept(ctx.kept_budget)
            # .data: the tiles are private to this node and their overwrite is tracked by kept_consumed; the version
            # bump of an in-place op (which the Triton kernels do not do anyway) would make a later backward's
            # ctx.saved_tensors raise instead of recomputing.
            kept.tiles = {k: t.data for k, t in zip(ctx.kept_keys, saved[3 : 3 + nk])}
        if ctx.gather_context is not None:
            w, b = ctx.w_param, ctx.b_param
        else:
            w, b = saved[3 + nk], saved[4 + nk]
        del saved
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with _enter(ctx.gather_context):
            gh, gw, gb = _backward_sweep(
                h, w, b, labels, lse, grad_logp, ctx.spec, kept, need_h, need_w, need_b and ctx.has_bias
            )
            gh = None if gh is None else gh.to(h.dtype)
            gw = None if gw is None else gw.to(w.dtype)
            gb = None if (gb is None or b is None) else gb.to(b.dtype)
        return gh, gw, gb, None, None, None, None, None, None


def _enter(gather_context: GatherContext | None) -> contextlib.AbstractContextManager[Any]:
    return gather_context() if gather_context is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_log_sum_p2: bool = False,
    return_mean_logit: bool = False,
    return_argmax_hit: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    validate: bool = True,
    backend: Backend = "auto",
    gather_context: GatherContext | None = None,
    keep_logits_bytes: int | None = None,
) -> TokenStats:
    """Per-token log-probs (and optional statistics) of ``labels`` under the LM head, without ``[N, V]`` logits.

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64).
        weight: ``[V, D]`` float (output embedding; may be tied to the input embedding — its gradient then simply
            accumulates; may be an FSDP2 ``DTensor`` — gathered once per call, gradient redistributed by autograd).
        labels: ``[...]`` integer (``hidden.shape[:-1]``), ``ignore_index`` or in ``[0, V)``.
        bias: optional ``[V]``.
        softcap, logit_scale, temperature: logit transform (module docstring).
        return_*: which statistics to compute (no gradient; see :class:`TokenStats`).
        chunk_size: vocabulary tile width, or ``(token tile, vocab tile)``; ``None`` picks from the shapes/device.
        validate: ``True`` checks that every label is ``ignore_index`` or in ``[0, V)`` before any kernel runs
            (``ValueError``; one device sync) and warns (``RuntimeWarning``) when a log-prob is NaN/inf (another
            sync). ``False`` skips both for hot loops; a label outside the vocabulary then gives a NaN log-prob
            (never an out-of-bounds access) and a zero gradient row, on both backends.
        backend: ``"auto"`` (Triton fold kernels on CUDA), ``"triton"``, ``"torch"``; float64 inputs always take
            the torch path.
        gather_context: ZeRO-3 style partitioned weight: a callable returning a context manager inside which
            ``weight``/``bias`` hold their full values; entered around the forward and around the backward sweep.
        keep_logits_bytes: raw logits kept from the forward to skip that part of the backward's recompute GEMM
            (default ``DEFAULT_KEEP_LOGITS_BYTES``; 0 keeps none).

    Returns:
        :class:`TokenStats`; ``logprobs`` fp32 shaped like ``labels``, 0 at ignored positions.
    """
    if gather_context is not None and not callable(gather_context):
        raise TypeError("gather_context must be a callable returning a context manager")
    with _enter(gather_context):
        stats = _token_logprobs_impl(
            hidden,
            weight,
            labels,
            bias,
            ignore_index,
            softcap,
            logit_scale,
            temperature,
            (return_entropy, return_log_sum_p2, return_mean_logit, return_argmax_hit),
            chunk_size,
            validate,
            backend,
            gather_context,
            keep_logits_bytes,
        )
    if validate:
        warn_nonfinite_output(stats.logprobs, "hidden states or weight")
    return stats


def _token_logprobs_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float,
    temperature: float,
    wanted: tuple[bool, bool, bool, bool],
    chunk_size: int | tuple[int, int] | None,
    validate: bool,
    backend: Backend,
    gather_context: GatherContext | None,
    keep_logits_bytes: int | None,
) -> TokenStats:
    """:func:`linear_token_logprobs` inside the caller's gather context."""
    return_entropy, return_log_sum_p2, return_mean_logit, return_argmax_hit = wanted
    _check_inputs(hidden, weight, labels, bias, softcap, logit_scale, temperature, ignore_index, validate)
    if keep_logits_bytes is None:
        keep_logits_bytes = DEFAULT_KEEP_LOGITS_BYTES
    if isinstance(keep_logits_bytes, bool) or not isinstance(keep_logits_bytes, int) or keep_logits_bytes < 0:
        raise ValueError(f"keep_logits_bytes must be an int >= 0, got {keep_logits_bytes!r}")
    device = hidden.device
    resolved = _resolve(backend, hidden)
    w = _gather_weight(weight)
    b = _gather_bias(bias)
    shape = labels.shape
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    lab = labels.reshape(-1)
    total = lab.shape[0]
    valid = lab != ignore_index
    idx = valid.nonzero().squeeze(1)
    n = idx.shape[0]
    if n == total:
        hc, labc, idx = h2, lab, None
    else:
        hc, labc = h2.index_select(0, idx), lab.index_select(0, idx)
    hc = hc.contiguous()
    w = w.contiguous() if gather_context is None else w
    labc = labc.to(torch.int64).contiguous()
    tok, voc = _plan(n, weight.shape[0], device, chunk_size, resolved)
    spec = _Spec(float(logit_scale), None if softcap is None else float(softcap), float(temperature), tok, voc, resolved)
    stats = return_entropy or return_log_sum_p2 or return_mean_logit
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if wants_grad:
        outs = _LinearLogprobs.apply(hc, w, b, labc, spec, stats, return_argmax_hit, keep_logits_bytes, gather_context)
        logp = outs[0]
        extras = list(outs[1:])
        entropy = log_sum_p2 = mean_logit = hit = None
        if stats:
            entropy, log_sum_p2, mean_logit = extras[0], extras[1], extras[2]
            extras = extras[3:]
        if return_argmax_hit:
            hit = extras[0]
    else:
        # reference mode: no autograd node, nothing saved, no gradient work.
        with torch.no_grad():
            st = _forward_sweep(hc, w, b, labc, spec, stats, return_argmax_hit, None)
            _, logp, entropy, log_sum_p2, mean_logit, hit = _outputs_from_fold(st, labc, weight.shape[0])

    def expand(t: torch.Tensor | None, fill: float | bool) -> torch.Tensor | None:
        if t is None:
            return None
        if idx is None:
            return t.reshape(shape)
        full = torch.full((total,), fill, dtype=t.dtype, device=device)
        return full.index_copy(0, idx, t).reshape(shape)

    return TokenStats(
        expand(logp, 0.0),  # type: ignore[arg-type]
        expand(entropy if return_entropy else None, 0.0),
        expand(log_sum_p2 if return_log_sum_p2 else None, 0.0),
        expand(mean_logit if return_mean_logit else None, 0.0),
        expand(hit, False),
    )


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    average: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    validate: bool = True,
    backend: Backend = "auto",
    gather_context: GatherContext | None = None,
    keep_logits_bytes: int | None = None,
) -> torch.Tensor:
    """Per-sequence summed (or, with ``average``, mean) label log-probs, fp32, differentiable.

    Layouts: ``hidden [B, T, D]`` + ``labels [B, T]`` -> ``[B]``; or ``hidden [N, D]`` + ``labels [N]`` +
    ``segment_ids [N]`` (+ ``num_segments``; ids of ignored positions are not used) -> ``[S]``. A sequence without
    any label has log-prob 0 (and zero gradient). ``num_segments`` without ``segment_ids`` is an error;
    ``num_segments=None`` infers ``max + 1`` over the labelled positions (one sync) and refuses a count above ``N``
    (a stray id: pass it explicitly). ``validate`` also checks the segment ids of labelled positions (in
    ``[0, S)``); with ``validate=False`` a token whose id lies outside adds to no sequence, and a NaN log-prob (an
    out-of-vocabulary label) propagates to its sequence. Other arguments as :func:`linear_token_logprobs`.
    """
    check_index("labels", labels)
    if segment_ids is None:
        if labels.dim() != 2:
            raise ValueError(f"without segment_ids labels must be [B, T], got {list(labels.shape)}")
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segment_ids")
    else:
        if labels.dim() != 1:
            raise ValueError(f"with segment_ids labels must be [N], got {list(labels.shape)}")
        check_index("segment_ids", segment_ids)
        check_same_device(labels=labels, segment_ids=segment_ids)
        if segment_ids.shape != labels.shape:
            raise ValueError(f"segment_ids must have shape {list(labels.shape)}, got {list(segment_ids.shape)}")
        sel = (labels != ignore_index).nonzero().squeeze(1)
        seg = segment_ids.index_select(0, sel)
        if num_segments is None:
            if seg.numel() == 0:
                raise ValueError("num_segments is required when no position has a label")
            inferred = int(seg.max()) + 1
            if inferred > labels.shape[0]:
                raise ValueError(
                    f"num_segments=None would infer max(segment_ids) + 1 = {inferred} segments from "
                    f"{labels.shape[0]} positions; pass num_segments explicitly (or check segment_ids for a stray id)"
                )
            num_segments = inferred
        num_segments = check_segments(seg, seg.shape[0], num_segments, validate=validate)
    tok = linear_token_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        softcap=softcap,
        logit_scale=logit_scale,
        temperature=temperature,
        chunk_size=chunk_size,
        validate=validate,
        backend=backend,
        gather_context=gather_context,
        keep_logits_bytes=keep_logits_bytes,
    ).logprobs
    if segment_ids is None:
        out = tok.sum(dim=1)
        if average:
            out = out / (labels != ignore_index).sum(dim=1).clamp(min=1).to(out.dtype)
        return out
    out = segment_sum(tok.index_select(0, sel), seg, num_segments, validate=False, backend=backend)
    if average:
        out = out / segment_counts(seg, num_segments).clamp(min=1).to(out.dtype)
    return out


def naive_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_log_sum_p2: bool = False,
    return_mean_logit: bool = False,
    return_argmax_hit: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    validate: bool = True,
    backend: Backend = "auto",
    gather_context: GatherContext | None = None,
    keep_logits_bytes: int | None = None,
) -> TokenStats:
    """Reference: materialize all logits in the input dtype (``hidden @ weight.T``), ``log_softmax`` in fp32 (fp64
    for fp64), gather. Same signature and outputs as :func:`linear_token_logprobs` (``chunk_size``, ``backend``,
    ``keep_logits_bytes`` are accepted and ignored). Memory ``O(N * V)``: baseline and test oracle only.
    """
    _check_inputs(hidden, weight, labels, bias, softcap, logit_scale, temperature, ignore_index, validate)
    with _enter(gather_context):
        w = _gather_weight(weight)
        b = _gather_bias(bias)
        logits = hidden @ w.t()
        if b is not None:
            logits = logits + b
    acc = _compute_dtype(hidden)
    z = logits.to(acc)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int64)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    logp = torch.where(valid, logp, zero)
    entropy = log_sum_p2 = mean_logit = hit = None
    with torch.no_grad():
        if return_entropy:  # p log p = 0 at a -inf logit (masked vocabulary); NaN stays NaN
            plogp = torch.where(logsm == float("-inf"), 0.0, logsm.exp() * logsm)
            entropy = torch.where(valid, -plogp.sum(-1), zero)
        if return_log_sum_p2:
            log_sum_p2 = torch.where(valid, torch.logsumexp(2.0 * logsm, dim=-1), zero)
        if return_mean_logit:
            mean_logit = torch.where(valid, z.mean(-1), zero)
        if return_argmax_hit:
            hit = (z.argmax(-1) == labels) & valid
    return TokenStats(logp, entropy, log_sum_p2, mean_logit, hit)


# ----------------------------------------------------------------------------------------------------------------
# grad-in-forward for pair-local losses
# ----------------------------------------------------------------------------------------------------------------


class SegmentStats(NamedTuple):
    """Per-segment sums handed to a grad-in-forward ``loss_fn`` (``[s]`` fp32, in the group's segment order).

    ``logp_sum``: plain ``sum_t log p_t`` (without ``token_weights``: the NLL of an LD-weighted sequence); like the
    ``seq_logps`` argument it requires grad, and its gradient reaches the head.
    ``log_sum_p2_sum``: ``sum_t log sum_v p_v^2``, detached (WPO's weights take no gradient; see
    :func:`fastdpo.losses.wpo_weights`); ``None`` unless ``segment_log_sum_p2=True``.
    """

    logp_sum: torch.Tensor
    log_sum_p2_sum: torch.Tensor | None


class _StoredGradLoss(torch.autograd.Function):
    """Returns ``loss``; backward hands out gradients computed in the forward, scaled by ``grad_output``.

    The stored gradients are saved for backward: autograd frees them after a backward without ``retain_graph`` (as
    it frees any saved tensor), and hands them out again on every backward of a retained graph.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        loss: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    ) -> torch.Tensor:
        ctx.save_for_backward(*grads)
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        refuse_double_backward("linear_logprobs_loss_grad_in_forward (grad_in_forward=True)")
        gh, gw, gb = ctx.saved_tensors

        def scale(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t * grad_out.to(t.dtype)

        return None, scale(gh), scale(gw), scale(gb), None


def linear_logprobs_loss_grad_in_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    loss_fn: Callable[..., torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    groups: Sequence[torch.Tensor] | None = None,
    token_weights: torch.Tensor | None = None,
    segment_stats: bool = False,
    segment_log_sum_p2: bool = False,
    chunk_size: int | None = None,
    validate: bool = True,
    backend: Backend = "auto",
    gather_context: GatherContext | None = None,
    logits_budget_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of per-sequence log-probs with the LM-head gradients formed during the forward (3 GEMMs, not 4).

    Args:
        hidden: ``[M, D]``; weight ``[V, D]``; labels ``[M]``; segment_ids ``[M]`` in ``[0, num_segments)``.
        loss_fn: ``loss_fn(seq_logps [s] fp32 requires_grad, group_segment_ids [s] int64) -> scalar``, the
            contribution of one group of segments (the total loss is the sum over groups). It may close over detached
            reference log-probs; gradients of anything else it touches are not propagated.
        groups: loss-local groups of segment ids (e.g. ``[tensor([i, P + i]) for i in range(P)]`` for pairs);
            ``None`` = one group of all segments. Segments in no group get log-probs but no loss.
        token_weights: ``[M]`` float, constant (no gradient): a segment's log-prob is ``sum_t w_t log p_t``
            (LD-DPO's length-desensitized sums); ``None`` = plain sums.
        segment_stats: call ``loss_fn(seq_logps, group_segment_ids, stats)`` with a :class:`SegmentStats` of the
            group. A token's gradient is then ``dL/dseq_logps * w_t + dL/dlogp_sum``.
        segment_log_sum_p2: with ``segment_stats``, also fill ``SegmentStats.log_sum_p2_sum`` (for WPO weights; the
            fold then computes the token statistics, more work per tile).
        chunk_size: max tokens per chunk of whole groups (default: as many as ``logits_budget_bytes`` of fp32 logits
            allow; a group larger than that is processed alone and recomputes the logits it could not keep).
        validate: as :func:`linear_token_logprobs` (label range check, non-finite warning), and also checks that
            every segment id lies in ``[0, num_segments)`` (one sync); with ``validate=False`` a token whose segment
            id lies outside belongs to no segment (no log-prob, no gradient).
        Others as :func:`linear_token_logprobs`.

    Returns:
        ``(loss, seq_logps)``: ``loss`` a 0-dim fp32 tensor whose backward multiplies the stored gradients by the
        incoming gradient (on every backward of a graph kept with ``retain_graph=True``; they are freed with the
        graph's saved tensors); ``seq_logps`` ``[S]`` fp32, detached. Without gradients to form (under
        ``torch.no_grad()`` / ``torch.inference_mode()``, or nothing requires grad) only the loss is computed.
    """
    if gather_context is not None and not callable(gather_context):
        raise TypeError("gather_context must be a callable returning a context manager")
    with _enter(gather_context):
        loss, seq_logps = _grad_in_forward_impl(
            hidden,
            weight,
            labels,
            segment_ids,
            num_segments,
            loss_fn,
            bias,
            ignore_index,
            softcap,
            logit_scale,
            temperature,
            groups,
            token_weights,
            segment_stats,
            segment_log_sum_p2,
            chunk_size,
            validate,
            backend,
            logits_budget_bytes,
        )
    if validate:
        warn_nonfinite_output(seq_logps, "hidden states or weight")
    return loss, seq_logps


def _grad_in_forward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    loss_fn: Callable[..., torch.Tensor],
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    logit_scale: float,
    temperature: float,
    groups: Sequence[torch.Tensor] | None,
    token_weights: torch.Tensor | None,
    segment_stats: bool,
    segment_log_sum_p2: bool,
    chunk_size: int | None,
    validate: bool,
    backend: Backend,
    logits_budget_bytes: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_logprobs_loss_grad_in_forward` inside the caller's gather context."""
    _check_inputs(hidden, weight, labels, bias, softcap, logit_scale, temperature, ignore_index, validate)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [M, D], got {list(hidden.shape)}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    check_index("segment_ids", segment_ids)
    check_same_device(labels=labels, segment_ids=segment_ids)
    if segment_ids.shape != labels.shape:
        raise ValueError(f"segment_ids must have shape {list(labels.shape)}, got {list(segment_ids.shape)}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}")
    if validate and segment_ids.numel() and bool(((segment_ids < 0) | (segment_ids >= num_segments)).any()):
        raise ValueError(f"segment_ids must lie in [0, {num_segments})")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 (tokens per chunk of groups), got {chunk_size!r}")
    if token_weights is not None:
        check_float("token_weights", token_weights)
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights must have shape {list(labels.shape)}, got {list(token_weights.shape)}")
        check_same_device(labels=labels, token_weights=token_weights)
    budget = DEFAULT_GIF_LOGITS_BYTES if logits_budget_bytes is None else logits_budget_bytes
    device = hidden.device
    resolved = _resolve(backend, hidden)
    vocab, d = weight.shape[0], weight.shape[1]

    # group list (python ints), segments in no group appended as loss-free groups
    seg_groups: list[list[int]] = []
    seen = torch.zeros(num_segments, dtype=torch.bool)
    for gi, grp in enumerate(groups if groups is not None else [torch.arange(num_segments)]):
        check_index(f"groups[{gi}]", grp)
        ids = [int(s) for s in grp.reshape(-1).tolist()]
        for s in ids:
            if not 0 <= s < num_segments:
                raise ValueError(f"groups[{gi}] holds segment id {s} outside [0, {num_segments})")
            if bool(seen[s]):
                raise ValueError(f"segment {s} appears in more than one group")
            seen[s] = True
        seg_groups.append(ids)
    n_loss_groups = len(seg_groups)
    rest = (~seen).nonzero().squeeze(1).tolist()
    seg_groups.extend([[s] for s in rest])

    # token lists per segment (valid labels only, in token order); a token whose segment id lies outside
    # [0, num_segments) (unvalidated input) belongs to no segment, as in segment_sum
    lab = labels.to(torch.int64)
    seg64 = segment_ids.to(torch.int64)
    valid_idx = ((lab != ignore_index) & (seg64 >= 0) & (seg64 < num_segments)).nonzero().squeeze(1)
    vseg = seg64.index_select(0, valid_idx)
    order = torch.sort(vseg, stable=True).indices
    tokens_by_seg = valid_idx.index_select(0, order)
    counts = segment_counts(vseg, num_segments).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)

    max_tokens = chunk_size if chunk_size is not None else max(1, budget // (4 * vocab))
    chunks: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for gi, ids in enumerate(seg_groups):
        ntok = sum(counts[s] for s in ids)
        if cur and cur_tokens + ntok > max_tokens:
            chunks.append(cur)
            cur, cur_tokens = [], 0
        cur.append(gi)
        cur_tokens += ntok
    if cur:
        chunks.append(cur)

    need_h = hidden.requires_grad and torch.is_grad_enabled()
    need_w = weight.requires_grad and torch.is_grad_enabled()
    need_b = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    acc = _compute_dtype(hidden)
    seq_logps = torch.zeros(num_segments, dtype=torch.float32, device=device)
    total_loss = torch.zeros((), dtype=torch.float32, device=device)
    grad_h = torch.zeros(hidden.shape[0], d, dtype=acc, device=device) if need_h else None
    grad_w = torch.zeros(vocab, d, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_b else None

    w_full = _gather_weight(weight)  # DTensor: autograd takes the gradient back to the placement
    b_full = _gather_bias(bias)
    with torch.no_grad():
        w = w_full.detach().contiguous()
        b = None if b_full is None else b_full.detach()
        h_all = hidden.detach()
        for chunk in chunks:
            seg_list = [s for gi in chunk for s in seg_groups[gi]]
            tok_parts = [tokens_by_seg[starts[s] : starts[s + 1]] for s in seg_list]
            rows = torch.cat(tok_parts) if tok_parts else valid_idx[:0]
            local_seg = torch.cat(
                [torch.full((starts[s + 1] - starts[s],), k, dtype=torch.int64) for k, s in enumerate(seg_list)]
            ).to(device)
            n = rows.shape[0]
            hc = h_all.index_select(0, rows).contiguous()
            labc = lab.index_select(0, rows).contiguous()
            tok_tile, voc_tile = _plan(n, vocab, device, None, resolved)
            spec = _Spec(
                float(logit_scale),
                None if softcap is None else float(softcap),
                float(temperature),
                tok_tile,
                voc_tile,
                resolved,
            )
            kept = _Kept(budget)
            st = _forward_sweep(hc, w, b, labc, spec, segment_stats and segment_log_sum_p2, False, kept)
            lse, logp, _, log_sum_p2, _, _ = _outputs_from_fold(st, labc, vocab)
            n_seg = len(seg_list)
            logp = logp.float()
            wc = None if token_weights is None else token_weights.index_select(0, rows).float()
            seq_chunk = segment_sum(logp if wc is None else logp * wc, local_seg, n_seg, validate=False,
                                    backend=backend)
            seq_logps[torch.tensor(seg_list, dtype=torch.int64, device=device)] = seq_chunk
            stats_chunk = None
            if segment_stats:
                stats_chunk = SegmentStats(
                    segment_sum(logp, local_seg, n_seg, validate=False, backend=backend),
                    None if log_sum_p2 is None else segment_sum(log_sum_p2.float(), local_seg, n_seg,
                                                                validate=False, backend=backend),
                )
            # d loss / d seq_logp per group, on leaf copies (loss only, no autograd, when no gradient is wanted:
            # under no_grad / inference_mode, or when nothing requires grad)
            need_grad = need_h or need_w or need_b
            dseq = torch.zeros(n_seg, dtype=torch.float32, device=device)
            dplain = torch.zeros(n_seg, dtype=torch.float32, device=device)  # d loss / d SegmentStats.logp_sum
            k0 = 0
            for gi in chunk:
                ids = seg_groups[gi]
                k1 = k0 + len(ids)
                if gi < n_loss_groups:
                    leaves = [seq_chunk[k0:k1].clone().requires_grad_(need_grad)]
                    args: tuple[Any, ...] = (leaves[0], torch.tensor(ids, dtype=torch.int64, device=device))
                    if stats_chunk is not None:
                        leaves.append(stats_chunk.logp_sum[k0:k1].clone().requires_grad_(need_grad))
                        lsp2 = stats_chunk.log_sum_p2_sum
                        args += (SegmentStats(leaves[1], None if lsp2 is None else lsp2[k0:k1]),)
                    with torch.enable_grad() if need_grad else contextlib.nullcontext():
                        loss_g = loss_fn(*args)
                        if not isinstance(loss_g, torch.Tensor) or loss_g.numel() != 1:
                            raise ValueError("loss_fn must return a scalar tensor")
                        if need_grad:
                            grads_g = torch.autograd.grad(loss_g.reshape(()), leaves, allow_unused=True)
                            if grads_g[0] is not None:
                                dseq[k0:k1] = grads_g[0]
                            if len(grads_g) > 1 and grads_g[1] is not None:
                                dplain[k0:k1] = grads_g[1]
                    total_loss += loss_g.detach().reshape(()).float()
                k0 = k1
            if not need_grad or n == 0:
                continue
            g = dseq.index_select(0, local_seg)
            if wc is not None:
                g = g * wc
            if stats_chunk is not None:
                g = g + dplain.index_select(0, local_seg)
            gh_c, _, _ = _backward_sweep(
                hc, w, b, labc, lse, g, spec, kept, need_h, need_w, need_b, grad_w, grad_b
            )
            if need_h:
                assert grad_h is not None and gh_c is not None
                grad_h.index_copy_(0, rows, gh_c)

    grads = (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(w_full.dtype),
        None if grad_b is None or b_full is None else grad_b.to(b_full.dtype),
    )
    if need_h or need_w or need_b:
        loss = _StoredGradLoss.apply(total_loss, hidden, w_full, b_full, grads)
    else:
        loss = total_loss
    return loss, seq_logps
