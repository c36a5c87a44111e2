"""Triton kernels: per-token log-probabilities from logits, and their gradient.

For one token row ``x = logits[row, :]`` (``V`` entries) with label ``y``:

    lse        = log(sum_j exp(x_j))             (the log-partition, computed in fp32)
    logp       = x_y - lse                       (the token's log-probability)
    dlogp/dx_j = onehot(y)_j - softmax(x)_j      = [j == y] - exp(x_j - lse)

Forward (:func:`logprobs_fwd_kernel`): one program per token row, one pass over the row with the online
log-sum-exp of :mod:`fastdpo.kernels._rows` (aligned 128-bit loads for any ``V``, per-thread running max and sum,
exp2 domain, one reduction after the loop). The target logit is one scalar load. It writes ``lse`` and ``logp``
(fp32, one value per row): the O(N) state the backward needs besides the logits. Rows whose label is
``ignore_index`` are skipped (``lse = logp = 0``); a label outside ``[0, V)`` (only possible with validation off)
gives ``logp = NaN`` and is never used as an address.

Backward (:func:`logprobs_bwd_kernel`): one program per row writing ``grad[row, j] = -g * exp(x_j - lse)`` for every
``j`` in one pass, then — after a barrier, so no other thread's write of that element can land later — the label
element ``g * (1 - exp(x_y - lse))`` from ``x_y`` read before the pass (no per-element one-hot compare). Ignored and
out-of-range rows get exact zeros. The gradient buffer may be the logits buffer itself (in-place backward): each
element is read before it is written by the same thread.

Logits are addressed as ``[B, T, V]`` with arbitrary strides (row ``r`` is ``(r // T, r % T)``): slices such as
``logits[:, :-1]`` need no copy. The row base offset is int64 (``N * V`` overflows int32 at real sizes); offsets inside
a row are int32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdpo.kernels._rows import LN2, LOG2E, M_INIT, edge_offsets, lse_finish, lse_update, row_layout, tile_offsets

# Row geometry arguments are not specialized on divisibility: alignment is handled in the kernel (row_layout), so one
# compiled kernel serves every V / T / stride (fewer JIT compiles; a unit column stride is still specialized).
_NO_SPEC = ["x_off", "T", "V", "stride_b", "stride_t", "ignore_index"]


@triton.jit(do_not_specialize=_NO_SPEC)
def logprobs_fwd_kernel(
    logits_ptr,  # [B, T, V] float16 / bfloat16 / float32, any strides, from element x_off (see aligned_base)
    x_off,
    labels_ptr,  # [B * T] int32 / int64, contiguous
    lse_ptr,  # out: [B * T] float32
    logp_ptr,  # out: [B * T] float32
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    ignore_index,
    BLOCK_V: tl.constexpr,  # logits per loop step
    ALIGN: tl.constexpr,  # logits per 16 bytes
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label != ignore_index:
        b = row // T
        r0 = x_off + b * stride_b + (row - b * T) * stride_t  # int64 row base
        start, head, n_body = row_layout(r0, V, stride_v, ALIGN)
        body = logits_ptr + start
        offs = tile_offsets(BLOCK_V, ALIGN)
        m = tl.full([BLOCK_V // ALIGN], M_INIT, tl.float32)  # per-slot running max
        s = tl.zeros([BLOCK_V // ALIGN], tl.float32)  # per-slot sum of exp(x - m)
        n_full = n_body // BLOCK_V * BLOCK_V
        for k in range(0, n_full, BLOCK_V):  # full blocks: unmasked 128-bit loads, no barrier
            # (block base) + (constant offsets): each address is base + immediate, even for scalar loads
            x = tl.load((body + k * stride_v) + offs * stride_v).to(tl.float32)
            m, s = lse_update(x, m, s)
        cols = n_full + offs  # the partial last block of the body (masked per 16-byte vector)
        x = tl.load(body + cols * stride_v, mask=cols < n_body, other=float("-inf")).to(tl.float32)
        m, s = lse_update(x, m, s)
        j, ok = edge_offsets(head, n_body, V, ALIGN)
        xe = tl.load(logits_ptr + r0 + j * stride_v, mask=ok, other=float("-inf")).to(tl.float32)
        mx, total = lse_finish(m, s, xe)
        lse = mx + tl.log2(total) * LN2
        in_range = (label >= 0) & (label < V)
        safe = tl.where(in_range, label, 0)
        target = tl.load(logits_ptr + r0 + safe * stride_v, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, target - lse)
    else:  # not a completion token: log-prob 0 (and the backward writes a zero gradient)
        tl.store(lse_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)


@triton.jit
def _grad_pass(
    x_ptr,
    g_ptr,
    r0,
    g0,
    V,
    stride_v,
    gstride_v,
    lse,
    neg_g,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``grad[g0 + j] = -g * exp(x[r0 + j] - lse)`` for the whole row: the body (``row_layout`` of ``x``, from
    element ``head``), then the edges. ``ALIGNED``: both body starts are 16-byte aligned (``g0 - r0`` a multiple of
    ``ALIGN``, unit strides: vector tiles); otherwise a flat block, so loads and stores share one register layout (no
    shuffle through shared memory)."""
    out_ty = g_ptr.dtype.element_ty
    start, head, n_body = row_layout(r0, V, stride_v, ALIGN)
    if ALIGNED:
        gstart = tl.multiple_of(g0 + (start - r0), ALIGN)
        offs = tile_offsets(BLOCK_V, ALIGN)
    else:
        start, gstart = r0 + head, g0 + head
        offs = tl.arange(0, BLOCK_V)
    n_full = n_body // BLOCK_V * BLOCK_V
    for k in range(0, n_full, BLOCK_V):
        x = tl.load(x_ptr + start + (k + offs) * stride_v).to(tl.float32)
        tl.store(g_ptr + gstart + (k + offs) * gstride_v, (neg_g * tl.exp2((x - lse) * LOG2E)).to(out_ty))
    cols = n_full + offs
    mask = cols < n_body
    x = tl.load(x_ptr + start + cols * stride_v, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + gstart + cols * gstride_v, (neg_g * tl.exp2((x - lse) * LOG2E)).to(out_ty), mask=mask)
    j, ok = edge_offsets(head, n_body, V, ALIGN)
    xe = tl.load(x_ptr + r0 + j * stride_v, mask=ok, other=0.0).to(tl.float32)
    tl.store(g_ptr + g0 + j * gstride_v, (neg_g * tl.exp2((xe - lse) * LOG2E)).to(out_ty), mask=ok)


@triton.jit
def _zero_row(g_ptr, g0, V, gstride_v, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr):
    """``grad[g0 + j] = 0`` for ``j < V`` (aligned vector stores like a read pass)."""
    gstart, head, n_body = row_layout(g0, V, gstride_v, ALIGN)
    offs = tile_offsets(BLOCK_V, ALIGN)
    zeros = tl.zeros([BLOCK_V // ALIGN, ALIGN], dtype=g_ptr.dtype.element_ty)
    for k in range(0, n_body, BLOCK_V):
        cols = k + offs
        tl.store(g_ptr + gstart + cols * gstride_v, zeros, mask=cols < n_body)
    j, ok = edge_offsets(head, n_body, V, ALIGN)
    tl.store(g_ptr + g0 + j * gstride_v, tl.zeros([2 * ALIGN], dtype=g_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_NO_SPEC + ["g_off", "gstride_b", "gstride_t"])
def logprobs_bwd_kernel(
    logits_ptr,  # [B, T, V] float, any strides (read), from element x_off
    x_off,
    labels_ptr,  # [B * T] int32 / int64, contiguous
    lse_ptr,  # [B * T] float32, from the forward
    grad_logp_ptr,  # [B * T] float32: dL/dlogp per token
    grad_ptr,  # out: [B, T, V] float, any strides (may alias logits_ptr), from element g_off
    g_off,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    gstride_b,
    gstride_t,
    gstride_v,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes of the narrower of logits and grad
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    r0 = x_off + b * stride_b + t * stride_t
    g0 = g_off + b * gstride_b + t * gstride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    if (label >= 0) & (label < V) & (label != ignore_index):
        g = tl.load(grad_logp_ptr + row).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        x_label = tl.load(logits_ptr + r0 + label * stride_v).to(tl.float32)  # read before the pass may clobber it
        if ((g0 - r0) % ALIGN == 0) & (stride_v == 1) & (gstride_v == 1):  # same alignment in both: vector stores
            _grad_pass(logits_ptr, grad_ptr, r0, g0, V, stride_v, gstride_v, lse, -g, BLOCK_V, ALIGN, True)
        else:  # rare (e.g. a sliced logits view and a fresh gradient buffer of another row stride)
            _grad_pass(logits_ptr, grad_ptr, r0, g0, V, stride_v, gstride_v, lse, -g, BLOCK_V, ALIGN, False)
        tl.debug_barrier()  # every thread's write of the label element has landed
        dx_label = g - g * tl.exp2((x_label - lse) * LOG2E)
        tl.store(grad_ptr + g0 + label * gstride_v, dx_label.to(grad_ptr.dtype.element_ty))
    else:
        # No completion token (or an out-of-range label): the gradient is exactly zero (never g * 0 * inf).
        _zero_row(grad_ptr, g0, V, gstride_v, BLOCK_V, ALIGN)
