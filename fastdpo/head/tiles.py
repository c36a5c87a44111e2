"""Tile primitives of the fused LM head: project one tile, fold it into the per-token state, turn it into its
logit gradient, and the GEMM operands around them.

Forward, per tile ``x = h @ w_tile.T + b_tile`` (fp32; fp64 for fp64 inputs), with ``z`` the transformed logits
(:class:`~fastdpo.head.plan._Spec`): the per-token running state (:class:`_Fold`) takes the online logsumexp, the
label's logit and, on request, ``sum p z`` (entropy), ``sum p^2`` and the vocabulary-mean logit, and the argmax. The
Triton kernel ``fastdpo.kernels.linear_fold`` does this on GPU, the equivalent in-place torch ops elsewhere.

Backward, per tile: ``d loss / d x = g * (onehot - softmax(z)) * dz/dx`` formed in place (the Triton kernel
``linear_grad_kernel``, or :func:`_grad_tile_plain` / :func:`_grad_tile_softcap`), then two GEMMs accumulate
``grad_hidden`` and ``grad_weight`` in fp32 (:func:`_mm_acc` is the precision contract for half inputs).

Torch path details: without a softcap, ``logit_scale / temperature`` is folded into the ``[N, D]`` hidden states and
the bias (:func:`_projection_operands`), so tiles hold final logits; the log-probs-only forward folds a tile with one
fused ``log_softmax`` (row-cache resident) instead of max / sub / exp / sum passes, keeping the running lse in
float64; the backward forms ``E' = exp(z - hi) - onehot / r`` in two in-place passes (``lse = hi + log(1/r)`` split
by :func:`_lse_split` so that ``z - hi`` is exact near the maximum, as naive ``z - max``) and moves the row factor
``-g * r`` onto the ``[N, D]`` GEMM operands.

A vocabulary tile whose logits are all -inf (a padded vocabulary masked through the bias) is legal: the fold shifts
by 0 while a row has seen only -inf, and such columns get exactly zero gradient. A label outside ``[0, V)``
(``validate=False``) gives a NaN log-prob and a zero gradient row: it never indexes a tile (:func:`_out_of_vocab`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastdpo._dtypes import accumulate_dtype
from fastdpo._launch import KernelLaunch, launch, next_pow2
from fastdpo.head.plan import _Spec

#: The log-probs-only fold takes a row's tile logsumexp from column 0 while log_softmax(z)_0 >= -limit (error
#: ~ulp(limit) ~ 1e-6) and from the row's maximum otherwise (two more reductions).
_LSE_COL0_LIMIT = 16.0


def _project_tile(
    h: torch.Tensor, w_tile: torch.Tensor, b_tile: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """``h @ w_tile.T + b_tile`` as an fp32 (fp64 for fp64 inputs) tile, written into ``out`` when given.

    Same-precision inputs go straight to the GEMM (``out=``); half inputs use the fp32-output GEMM on CUDA (straight
    into ``out``, no extra tile) and are up-cast on CPU (no fast half GEMM there).
    """
    acc = accumulate_dtype(h.dtype)
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
        "BLOCK_V": min(1024, max(16, next_pow2(cols))),
        "ALIGN": 16 // x.element_size(),
    }
    return KernelLaunch(linear_fold_kernel, (rows,), args, constexprs, 4, x.device)


def _fold_tile_triton(
    x: torch.Tensor, st: _Fold, n0: int, n1: int, labels: torch.Tensor, v0: int, vocab: int, spec: _Spec
) -> None:
    launch(_fold_launch(x, st, n0, n1, labels, v0, vocab, spec))


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
    z: torch.Tensor, hi: torch.Tensor, inv_r: torch.Tensor, hits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
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


class _GradRows(NamedTuple):
    """The per-row operands of the logit-gradient kernel, ``[rows]`` each: ``labels`` (int64), the logsumexp split
    ``(hi, r)`` of :func:`_lse_split` (fp32) and ``g`` = d loss / d logprob (fp32, contiguous)."""

    labels: torch.Tensor
    hi: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor

    def rows(self, n0: int, n1: int) -> _GradRows:
        """Rows ``n0:n1`` of every operand (views)."""
        return _GradRows(*(t[n0:n1] for t in self))


def _grad_launch(x: torch.Tensor, out: torch.Tensor, rows: _GradRows, v0: int, vocab: int, spec: _Spec) -> KernelLaunch:
    """The logit-gradient kernel's launch: raw fp32 tile ``x [rows, c]`` (vocabulary columns ``v0:v0 + c``) -> d loss
    / d x in ``out`` (``x`` itself, or a buffer of the GEMM operand dtype with ``x``'s strides)."""
    from fastdpo.kernels.linear_fold import linear_grad_kernel

    if out.stride() != x.stride() or x.stride(1) != 1:
        raise ValueError(
            f"the logit-gradient kernel needs out with x's strides and unit column stride, got "
            f"{out.stride()} and {x.stride()}"
        )
    n, cols = x.shape
    scale, inv_softcap, out_mult = spec.kernel_consts()
    args = (x, x.stride(0), out, cols, v0, vocab, *rows, scale, inv_softcap, out_mult)
    constexprs = {
        "HAS_SOFTCAP": spec.softcap is not None,
        "BLOCK_V": min(1024, max(16, next_pow2(cols))),
        "ALIGN": 16 // min(x.element_size(), out.element_size()),
    }
    return KernelLaunch(linear_grad_kernel, (n,), args, constexprs, 4, x.device)


def _grad_tile_triton(
    x: torch.Tensor, rows: _GradRows, v0: int, vocab: int, spec: _Spec, out_dtype: torch.dtype
) -> torch.Tensor:
    """d loss / d x of tile ``x`` written straight in ``out_dtype`` (the GEMM operand dtype): in place when that is
    ``x``'s dtype, else into a buffer with ``x``'s strides (same alignment per row: vector loads and stores)."""
    out = x if out_dtype == x.dtype else torch.empty_strided(x.shape, x.stride(), dtype=out_dtype, device=x.device)
    launch(_grad_launch(x, out, rows, v0, vocab, spec))
    return out


def _projection_operands(
    h: torch.Tensor, b: torch.Tensor | None, spec: _Spec
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(h_p, b_p, tile_is_z)`` for the projection GEMM.

    Torch path without softcap: ``scale / temperature`` is folded into ``[n, D]`` hidden and the bias, so every tile
    directly holds the final logits ``z`` (no transform pass). Otherwise (softcap, or the Triton kernels, which apply
    the transform themselves) tiles hold the raw projection. Half inputs on CPU are up-cast once here.
    """
    acc = accumulate_dtype(h.dtype)
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
