"""Triton kernels of the fused LM head: a per-row fold of one logits tile and the in-place logit-gradient transform.

The projection itself is done by the vendor GEMM (``torch.mm``) tile by tile; these kernels consume one raw tile
``x = hidden_tile @ weight_tile.T (+ bias_tile)`` of shape ``[rows, cols]`` (row stride ``stride_x``, unit column
stride) whose columns are vocabulary ids ``col_offset + j``. The logit transform is applied on the fly:

    z = x * scale;  if HAS_SOFTCAP: z = softcap * tanh(z / softcap);  z = z / temperature

passed as ``scale``, ``inv_softcap`` (1 / softcap) and ``out_mult`` (softcap / temperature with a softcap,
1 / temperature without). All arithmetic is fp32; offsets are int64; one program handles one row, so no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(y):
    # tanh through exp of a non-positive argument: no overflow, accurate for large |y|.
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _transform(x, scale, inv_softcap, out_mult, HAS_SOFTCAP: tl.constexpr):
    z = x * scale
    if HAS_SOFTCAP:
        z = _tanh(z * inv_softcap)
    return z * out_mult


@triton.jit
def linear_fold_kernel(
    x_ptr,
    stride_x,
    n_cols,
    col_offset,
    labels_ptr,
    m_ptr,
    s_ptr,
    target_ptr,
    t_ptr,
    s2_ptr,
    zsum_ptr,
    amax_ptr,
    aidx_ptr,
    scale,
    inv_softcap,
    out_mult,
    HAS_SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one tile row into the running per-row state (online logsumexp).

    State (all fp32 ``[rows]`` except ``aidx`` int64), updated in place:
      ``m`` running max, ``s`` = sum exp(z - m), ``target`` += z[label] when the label lies in this tile;
      with STATS: ``t`` = sum exp(z - m) * z, ``s2`` = sum exp(z - m)^2, ``zsum`` += sum z;
      with ARGMAX: ``amax``/``aidx`` running maximum and its first index (strictly greater wins: first max kept).
    Start values: m = amax = -inf, everything else 0.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    label = tl.load(labels_ptr + row).to(tl.int64)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    target = tl.load(target_ptr + row)
    if STATS:
        t = tl.load(t_ptr + row)
        s2 = tl.load(s2_ptr + row)
        zsum = tl.load(zsum_ptr + row)
    if ARGMAX:
        amax = tl.load(amax_ptr + row)
        aidx = tl.load(aidx_ptr + row)
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z = _transform(x, scale, inv_softcap, out_mult, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        if STATS:
            z0 = tl.where(mask, z, 0.0)
            t = t * alpha + tl.sum(e * z0, axis=0)
            s2 = s2 * alpha * alpha + tl.sum(e * e, axis=0)
            zsum = zsum + tl.sum(z0, axis=0)
        if ARGMAX:
            block_idx = tl.argmax(z, axis=0, tie_break_left=True).to(tl.int64)
            better = block_max > amax
            aidx = tl.where(better, col_offset + start + block_idx, aidx)
            amax = tl.where(better, block_max, amax)
        hit = mask & ((cols + col_offset) == label)
        target = target + tl.sum(tl.where(hit, z, 0.0), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(target_ptr + row, target)
    if STATS:
        tl.store(t_ptr + row, t)
        tl.store(s2_ptr + row, s2)
        tl.store(zsum_ptr + row, zsum)
    if ARGMAX:
        tl.store(amax_ptr + row, amax)
        tl.store(aidx_ptr + row, aidx)


@triton.jit
def linear_grad_kernel(
    x_ptr,
    stride_x,
    out_ptr,
    stride_out,
    n_cols,
    col_offset,
    labels_ptr,
    lse_ptr,
    g_ptr,
    scale,
    inv_softcap,
    out_mult,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Turn a raw logits tile into d loss / d x (x = hidden @ weight.T + bias), writing ``out`` (may alias ``x``).

    d/dz of ``g * log_softmax(z)[label]`` is ``g * (onehot(label) - softmax(z))``; the chain rule through the
    transform multiplies by ``scale * out_mult * inv_softcap * (1 - tanh^2)`` with a softcap and by
    ``scale * out_mult`` without. ``lse`` and ``g`` are fp32 ``[rows]``.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    o_row = out_ptr + row * stride_out
    label = tl.load(labels_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            th = _tanh(x * scale * inv_softcap)
            z = th * out_mult
            dz = scale * inv_softcap * out_mult * (1.0 - th * th)
        else:
            z = x * scale * out_mult
            dz = scale * out_mult
        p = tl.exp(z - lse)
        onehot = tl.where((cols + col_offset) == label, 1.0, 0.0)
        grad = g * (onehot - p) * dz
        tl.store(o_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)
