"""Triton kernels: per-token log-probabilities from logits, and their gradient.

For one token row ``x = logits[row, :]`` (``V`` entries) with label ``y``:

    lse        = log(sum_j exp(x_j))             (the log-partition, computed in fp32)
    logp       = x_y - lse                       (the token's log-probability)
    dlogp/dx_j = onehot(y)_j - softmax(x)_j      = [j == y] - exp(x_j - lse)

Forward (:func:`logprobs_fwd_kernel`): one program per token row, one pass over the row in blocks of ``BLOCK_V``
columns with the online (streaming) log-sum-exp:

    m_new = max(m, max(block))                   (running max, identity -inf)
    s     = s * exp(m - m_new) + sum(exp(block - m_new))
    lse   = m + log(s)                           (after the last block)

It writes ``lse`` and ``logp`` (both fp32, one value per row): the O(N) state the backward needs besides the
logits themselves. Rows whose label is ``ignore_index`` are skipped (``lse = logp = 0``).

Backward (:func:`logprobs_bwd_kernel`): one program per row, one pass writing
``grad[row, j] = g[row] * ([j == y] - exp(x_j - lse))`` in the gradient buffer's dtype; ignored rows get zeros.
The gradient buffer may be the logits buffer itself (in-place backward): each element is read before it is written
by the same program, so this is safe.

Logits are addressed as ``[B, T, V]`` with arbitrary strides (row ``r`` is ``(r // T, r % T)``), so slices such as
``logits[:, :-1]`` need no copy. Offsets are int64 (``N * V`` overflows int32 at real sizes).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logprobs_fwd_kernel(
    logits_ptr,  # [B, T, V] float16 / bfloat16 / float32, any strides
    labels_ptr,  # [B * T] int64, contiguous
    lse_ptr,  # out: [B * T] float32
    logp_ptr,  # out: [B * T] float32
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_b + t * stride_t
    label = tl.load(labels_ptr + row).to(tl.int64)

    if label != ignore_index:
        offs = tl.arange(0, BLOCK_V)
        m = float("-inf")  # running max (identity -inf: all-negative logits are normal)
        s = 0.0  # running sum of exp(x - m)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # Shift by 0 while every logit so far is -inf (e.g. a masked vocabulary block): exp(-inf - 0) = 0
            # instead of exp(-inf + inf) = NaN. Masked tail columns also contribute exp(-inf) = 0.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(row_ptr + label * stride_v).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, target - lse)
    else:  # not a completion token: log-prob 0 (and the backward writes a zero gradient)
        tl.store(lse_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)


@triton.jit
def logprobs_bwd_kernel(
    logits_ptr,  # [B, T, V] float, any strides (read)
    labels_ptr,  # [B * T] int64, contiguous
    lse_ptr,  # [B * T] float32, from the forward
    grad_logp_ptr,  # [B * T] float32: dL/dlogp per token
    grad_ptr,  # out: [B, T, V] in the logits dtype, any strides (may alias logits_ptr)
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
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_b + t * stride_t
    grad_row_ptr = grad_ptr + b * gstride_b + t * gstride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)

    if label != ignore_index:
        g = tl.load(grad_logp_ptr + row).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)  # softmax(x)_j (0 on masked tail columns)
            onehot = tl.where(cols == label, 1.0, 0.0)
            dx = g * (onehot - p)
            tl.store(grad_row_ptr + cols.to(tl.int64) * gstride_v, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        # No completion token here: the gradient is exactly zero (never g * 0 * inf).
        zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(grad_row_ptr + cols.to(tl.int64) * gstride_v, zeros, mask=cols < V)
