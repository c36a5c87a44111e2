"""The two sweeps of the fused LM head over its ``(token tile, vocabulary tile)`` grid.

:func:`_forward_sweep`: one GEMM per tile, folded into the per-token state (:class:`~fastdpo.head.tiles._Fold`).
:func:`_backward_sweep`: recompute each tile (or reuse one :class:`_Kept` from the forward), form its logit gradient
in place and accumulate ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` with two more GEMMs, deterministically
(fixed tile order, vocabulary tiles outer, no atomics). Both take the compacted ``[n, D]`` hidden states of the
labelled positions only.
"""

from __future__ import annotations

import torch

from fastdpo._dtypes import accumulate_dtype
from fastdpo.head.plan import _Spec
from fastdpo.head.tiles import (
    _Fold,
    _fold_tile_torch,
    _fold_tile_triton,
    _gemm_dtype,
    _grad_tile_plain,
    _grad_tile_softcap,
    _grad_tile_triton,
    _GradRows,
    _LabelTiles,
    _lse_split,
    _mm_acc,
    _out_of_vocab,
    _project_tile,
    _projection_operands,
    _tiles,
)


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
    acc = accumulate_dtype(h.dtype)
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
    acc = accumulate_dtype(h.dtype)
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
    grad_rows = _GradRows(labels, hi, r, gc) if triton else None
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
            G = _grad_tile_triton(x, grad_rows.rows(n0, n1), v0, vocab, spec, gemm_dtype)  # type: ignore[union-attr]
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
