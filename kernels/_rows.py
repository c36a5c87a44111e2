"""Shared Triton helpers: one row of logits folded in 16-byte-aligned blocks with per-thread state.

Layout of a row walk (``V`` logits at ``ptr + r0 + j * stride``). With a unit stride the row is split into

    head  = [0, h)                 h < ALIGN elements before the first 16-byte boundary (``ALIGN = 16 / itemsize``)
    body  = [h, h + n_body)        n_body a multiple of ALIGN: full-width (128-bit) vector loads, unmasked except in
                                   the last, partial block
    tail  = [h + n_body, V)        < ALIGN elements

so any ``V`` and any row offset keep vector loads (a vocabulary of 50257 is not a multiple of 16 bytes). The head and
tail ("edges", at most ``2 * ALIGN - 2`` elements) are one small masked load. A non-unit stride has no head.

A body block is a ``[BLOCK // ALIGN, ALIGN]`` tile: each row of the tile is one vector and lies in one thread, so a
reduction over ``axis=1`` stays inside the thread. Every tile row is a *slot* with its own running state (max ``m``,
rescaled sum ``s``, ...), updated with no communication between threads; the slots are combined once per row of
logits, after the loop (the only barriers/shuffles of a kernel).

Online log-sum-exp in the exp2 domain (``exp(x) = exp2(x * LOG2E)``), per slot, per block chunk ``c`` of the slot:

    m'  = max(m, max(c))
    s   = s * exp2((m - m') * LOG2E) + sum(exp2((c - m') * LOG2E))

(the difference first, then the scale: ``c * LOG2E - m' * LOG2E`` saves an instruction but loses ~|m| * 1e-7 of
absolute accuracy in the exponent, visible at large logits).

``m`` starts at ``M_INIT = -1e38`` (finite) instead of -inf, so a chunk of -inf logits (a masked vocabulary) gives
``exp2(-inf - finite) = 0`` and never ``-inf - -inf = NaN``; a row whose logits are all -inf keeps ``s = 0`` and
``lse = m + log(0) = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
M_INIT = tl.constexpr(-1e38)  # finite stand-in for -inf as the running-max identity (see module docstring)


@triton.jit
def row_layout(r0, V, stride, ALIGN: tl.constexpr):
    """``(start, head, n_body)``: the body starts at element offset ``start = r0 + head`` (16-byte aligned when
    ``stride == 1`` and the base pointer is), ``n_body`` is a multiple of ALIGN, ``head + n_body <= V``."""
    if stride == 1:
        start = (r0 + (ALIGN - 1)) // ALIGN * ALIGN  # a multiple of ALIGN by construction: the compiler sees it
        head = tl.minimum(start - r0, V).to(tl.int32)
    else:
        start = r0
        head = tl.full([], 0, tl.int32)
    n_body = (V - head) // ALIGN * ALIGN
    return start, head, n_body


@triton.jit
def edge_offsets(head, n_body, V, ALIGN: tl.constexpr):
    """Row offsets ``j`` and mask of the head and tail elements: ``[2 * ALIGN]`` int32 / bool."""
    e = tl.arange(0, 2 * ALIGN)
    j = tl.where(e < ALIGN, e, head + n_body + (e - ALIGN))
    ok = tl.where(e < ALIGN, e < head, j < V)
    return j, ok


@triton.jit
def tile_offsets(BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """``[BLOCK // ALIGN, ALIGN]`` int32 offsets 0..BLOCK-1: one 16-byte vector per tile row."""
    return tl.arange(0, BLOCK // ALIGN)[:, None] * ALIGN + tl.arange(0, ALIGN)[None, :]


@triton.jit
def lse_update(x, m, s):
    """Fold tile ``x [R, ALIGN]`` (fp32) into the per-slot running ``(m, s) [R]`` (thread-local: no barrier)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((x - m_new[:, None]) * LOG2E), axis=1)
    return m_new, s


@triton.jit
def lse_finish(m, s, xe):
    """Combine the slots ``(m, s) [R]`` and the edge logits ``xe`` (-inf where masked): ``(max, sum exp(x - max))``."""
    mx = tl.maximum(tl.max(m, axis=0), tl.max(xe, axis=0))
    total = tl.sum(s * tl.exp2((m - mx) * LOG2E), axis=0) + tl.sum(tl.exp2((xe - mx) * LOG2E), axis=0)
    return mx, total


@triton.jit
def tanh(y):
    """tanh through exp2 of a non-positive argument: no overflow, accurate for large |y|."""
    e = tl.exp2(tl.abs(y) * (-2.0 * LOG2E))  # tensor first: constexpr * tensor fails in the interpreter
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)
