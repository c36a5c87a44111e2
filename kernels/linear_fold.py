"""Triton kernels of the fused LM head: a per-row fold of one logits tile and the logit-gradient transform.

The projection itself is done by the vendor GEMM (``torch.mm``) tile by tile; these kernels consume one raw fp32 tile
``x = hidden_tile @ weight_tile.T (+ bias_tile)`` of shape ``[rows, cols]`` (row stride ``stride_x``, unit column
stride) whose columns are vocabulary ids ``col_offset + j`` of a vocabulary of ``vocab`` ids. The logit transform is
applied on the fly:

    z = x * scale;  if HAS_SOFTCAP: z = softcap * tanh(z / softcap);  z = z / temperature

passed as ``scale``, ``inv_softcap`` (1 / softcap) and ``out_mult`` (softcap / temperature with a softcap,
1 / temperature without). Arithmetic is fp32 in the exp2 domain; one program handles one row (no atomics); rows are
walked in aligned vector blocks with per-thread state and one combine per tile row (see :mod:`fastdpo.kernels._rows`).
The target logit is one scalar load per row. A label outside ``[0, vocab)`` (only possible with validation off) gives a
NaN target (so a NaN log-prob) in the fold and a zero gradient row, and is never used as an address.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdpo.kernels._rows import LOG2E, M_INIT, edge_offsets, row_layout, tanh, tile_offsets

_NO_SPEC = ["stride_x", "n_cols", "col_offset", "vocab"]


@triton.jit
def _transform(x, scale, inv_softcap, out_mult, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return tanh(x * (scale * inv_softcap)) * out_mult
    return x * (scale * out_mult)


@triton.jit
def _first_max(v1, i1, v2, i2):
    """Combine of (value, column) pairs: the larger value; on a tie the smaller column (first maximum wins)."""
    take1 = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _fold_update(z, z_sum, col, m, s, t, s2, zs, ai, STATS: tl.constexpr, ARGMAX: tl.constexpr):
    """Fold tile ``z [R, ALIGN]`` (fp32 logits, -inf where masked; ``z_sum``: the same with 0 where masked; column
    of element ``[r, 0]`` in ``col [R]``) into the per-slot state ``[R]`` (all thread-local)."""
    cmax = tl.max(z, axis=1)
    m_new = tl.maximum(m, cmax)
    alpha = tl.exp2((m - m_new) * LOG2E)
    e = tl.exp2((z - m_new[:, None]) * LOG2E)
    s = s * alpha + tl.sum(e, axis=1)
    if STATS:
        zc = tl.maximum(z, M_INIT)  # a -inf logit (masked vocabulary) adds e * z = 0, not 0 * -inf = NaN
        t = t * alpha + tl.sum(e * zc, axis=1)
        s2 = s2 * (alpha * alpha) + tl.sum(e * e, axis=1)
        zs = zs + tl.sum(z_sum, axis=1)
    if ARGMAX:
        # strictly greater: within a slot columns only grow, so the first maximum is kept
        ai = tl.where(cmax > m, col + tl.argmax(z, axis=1, tie_break_left=True), ai)
    return m_new, s, t, s2, zs, ai


@triton.jit(do_not_specialize=_NO_SPEC)
def linear_fold_kernel(
    x_ptr,
    stride_x,
    n_cols,
    col_offset,
    vocab,
    labels_ptr,
    m_ptr,
    s_ptr,
    target_ptr,
    t_ptr,
    s2_ptr,
    zsum_ptr,
    aidx_ptr,
    scale,
    inv_softcap,
    out_mult,
    HAS_SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Fold one tile row into the running per-row state (online logsumexp).

    State (fp32 ``[rows]``, ``aidx`` int64), updated in place:
      ``m`` running max, ``s`` = sum exp(z - m), ``target`` += z[label] when the label lies in this tile (NaN when the
      label is outside the vocabulary); with STATS: ``t`` = sum exp(z - m) * z, ``s2`` = sum exp(z - m)^2,
      ``zsum`` += sum z; with ARGMAX: ``aidx`` = first index of the running maximum ``m`` (strictly greater wins).
    Start values: m = -inf, everything else 0. Exponential terms of -inf logits are 0 (``e * z`` included).
    """
    row = tl.program_id(0).to(tl.int64)
    r0 = row * stride_x
    start, head, n_body = row_layout(r0, n_cols, 1, ALIGN)
    offs = tile_offsets(BLOCK_V, ALIGN)
    slot_col = head + tl.arange(0, BLOCK_V // ALIGN) * ALIGN  # tile column of each slot's first element
    m = tl.full([BLOCK_V // ALIGN], M_INIT, tl.float32)
    s = tl.zeros([BLOCK_V // ALIGN], tl.float32)
    t = tl.zeros([BLOCK_V // ALIGN], tl.float32)
    s2 = tl.zeros([BLOCK_V // ALIGN], tl.float32)
    zs = tl.zeros([BLOCK_V // ALIGN], tl.float32)
    ai = tl.zeros([BLOCK_V // ALIGN], tl.int32)
    n_full = n_body // BLOCK_V * BLOCK_V
    for k in range(0, n_full, BLOCK_V):  # full blocks: unmasked 128-bit loads, no barrier
        z = _transform(tl.load(x_ptr + start + (k + offs)), scale, inv_softcap, out_mult, HAS_SOFTCAP)
        m, s, t, s2, zs, ai = _fold_update(z, z, k + slot_col, m, s, t, s2, zs, ai, STATS, ARGMAX)
    cols = n_full + offs
    x = tl.load(x_ptr + start + cols, mask=cols < n_body, other=float("-inf"))
    z = _transform(x, scale, inv_softcap, out_mult, HAS_SOFTCAP)
    z_in = tl.where(cols < n_body, z, float("-inf"))
    z_sum = tl.where(cols < n_body, z, 0.0)
    m, s, t, s2, zs, ai = _fold_update(z_in, z_sum, n_full + slot_col, m, s, t, s2, zs, ai, STATS, ARGMAX)
    j, ok = edge_offsets(head, n_body, n_cols, ALIGN)
    ze = tl.where(
        ok,
        _transform(tl.load(x_ptr + r0 + j, mask=ok, other=0.0), scale, inv_softcap, out_mult, HAS_SOFTCAP),
        float("-inf"),
    )
    # combine the slots, the edges and the running state of the previous tiles
    m_prev = tl.load(m_ptr + row)
    mx = tl.maximum(tl.max(m, axis=0), tl.max(ze, axis=0))
    m_new = tl.maximum(m_prev, mx)
    a_prev = tl.exp2((m_prev - m_new) * LOG2E)  # m_prev = -inf before the first tile: 0
    a = tl.exp2((m - m_new) * LOG2E)
    ee = tl.exp2((ze - m_new) * LOG2E)
    tl.store(s_ptr + row, tl.load(s_ptr + row) * a_prev + tl.sum(s * a, axis=0) + tl.sum(ee, axis=0))
    if STATS:
        zec = tl.maximum(ze, M_INIT)
        t_new = tl.load(t_ptr + row) * a_prev + tl.sum(t * a, axis=0) + tl.sum(ee * zec, axis=0)
        s2_new = tl.load(s2_ptr + row) * (a_prev * a_prev) + tl.sum(s2 * (a * a), axis=0) + tl.sum(ee * ee, axis=0)
        zsum_new = tl.load(zsum_ptr + row) + tl.sum(zs, axis=0) + tl.sum(tl.where(ok, ze, 0.0), axis=0)
        tl.store(t_ptr + row, t_new)
        tl.store(s2_ptr + row, s2_new)
        tl.store(zsum_ptr + row, zsum_new)
    if ARGMAX:
        v_body, c_body = tl.reduce((m, ai), 0, _first_max)
        v_edge, c_edge = tl.reduce((ze, j), 0, _first_max)
        _, col = _first_max(v_body, c_body, v_edge, c_edge)
        aidx = tl.load(aidx_ptr + row)
        tl.store(aidx_ptr + row, tl.where(mx > m_prev, col_offset + col, aidx))
    tl.store(m_ptr + row, m_new)
    # target logit: one scalar load when the label lies in this tile
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - col_offset
    hit = (local >= 0) & (local < n_cols)
    xl = tl.load(x_ptr + r0 + tl.where(hit, local, 0), mask=hit, other=0.0)
    zl = tl.where(hit, _transform(xl, scale, inv_softcap, out_mult, HAS_SOFTCAP), 0.0)
    target = tl.load(target_ptr + row) + zl
    tl.store(target_ptr + row, tl.where((label >= 0) & (label < vocab), target, float("nan")))


@triton.jit
def _dx(x, hi, gc, gr, scale, inv_softcap, out_mult, HAS_SOFTCAP: tl.constexpr, IS_LABEL: tl.constexpr):
    """d loss / d x of raw logits ``x``: ``gc * (onehot - p) * (1 - th^2 with a softcap)``, in the output dtype of the
    caller's store (converted there). ``gc = g * dz/dx`` without the softcap's ``1 - th^2``; ``p = r * exp(z - hi)``
    with the row's logsumexp split as ``lse = hi - log(r)`` (``hi`` its nearest fp32, ``r`` = 1 up to an ulp) and
    ``gr = gc * r``: ``z - hi`` is exact near the row's maximum, so large logits keep fp32-level gradients."""
    if HAS_SOFTCAP:
        th = tanh(x * (scale * inv_softcap))
        p = tl.exp2((th * out_mult - hi) * LOG2E)
        d = 1.0 - th * th
    else:
        p = tl.exp2((x * (scale * out_mult) - hi) * LOG2E)
        d = 1.0
    if IS_LABEL:
        return (gc - gr * p) * d
    return (-gr * p) * d


@triton.jit(do_not_specialize=_NO_SPEC)
def linear_grad_kernel(
    x_ptr,
    stride_x,
    out_ptr,
    n_cols,
    col_offset,
    vocab,
    labels_ptr,
    hi_ptr,
    r_ptr,
    g_ptr,
    scale,
    inv_softcap,
    out_mult,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes of the narrower of x and out
):
    """Turn a raw fp32 logits tile into d loss / d x (x = hidden @ weight.T + bias), written to ``out`` in its dtype
    (the GEMM operand dtype) with ``x``'s strides; ``out`` may alias ``x`` when that is fp32.

    d/dz of ``g * log_softmax(z)[label]`` is ``g * (onehot(label) - softmax(z))``; the chain rule through the
    transform multiplies by ``scale * out_mult * inv_softcap * (1 - tanh^2)`` with a softcap and by
    ``scale * out_mult`` without. ``hi``, ``r`` (the split logsumexp, see ``_dx``) and ``g`` are fp32 ``[rows]``. Every
    element gets ``-g * p * dz/dx`` in one pass; after a barrier the label element (if in this tile) gets ``g * (1 - p)
    * dz/dx`` from its logit read before the pass. A label outside ``[0, vocab)`` gives a zero row.
    """
    row = tl.program_id(0).to(tl.int64)
    r0 = row * stride_x  # row base in x and in out (same strides: same alignment, vector loads and stores)
    label = tl.load(labels_ptr + row).to(tl.int64)
    hi = tl.load(hi_ptr + row)
    valid = (label >= 0) & (label < vocab)
    g = tl.where(valid, tl.load(g_ptr + row), 0.0)
    if HAS_SOFTCAP:
        gc = g * (scale * inv_softcap * out_mult)
    else:
        gc = g * (scale * out_mult)
    gr = gc * tl.load(r_ptr + row)
    local = label - col_offset
    hit = valid & (local >= 0) & (local < n_cols)
    xl = tl.load(x_ptr + r0 + tl.where(hit, local, 0), mask=hit, other=0.0)  # before the pass may overwrite it
    start, head, n_body = row_layout(r0, n_cols, 1, ALIGN)
    offs = tile_offsets(BLOCK_V, ALIGN)
    n_full = n_body // BLOCK_V * BLOCK_V
    for k in range(0, n_full, BLOCK_V):  # full blocks: unmasked vector loads and stores
        x = tl.load(x_ptr + start + (k + offs))
        tl.store(out_ptr + start + (k + offs), _dx(x, hi, gc, gr, scale, inv_softcap, out_mult, HAS_SOFTCAP, False))
    cols = n_full + offs
    mask = cols < n_body
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0)
    tl.store(out_ptr + start + cols, _dx(x, hi, gc, gr, scale, inv_softcap, out_mult, HAS_SOFTCAP, False), mask=mask)
    j, ok = edge_offsets(head, n_body, n_cols, ALIGN)
    xe = tl.load(x_ptr + r0 + j, mask=ok, other=0.0)
    tl.store(out_ptr + r0 + j, _dx(xe, hi, gc, gr, scale, inv_softcap, out_mult, HAS_SOFTCAP, False), mask=ok)
    if hit:
        tl.debug_barrier()  # every thread's write of the label element has landed
        tl.store(out_ptr + r0 + local, _dx(xl, hi, gc, gr, scale, inv_softcap, out_mult, HAS_SOFTCAP, True))
