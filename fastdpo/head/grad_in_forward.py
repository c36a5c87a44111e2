"""Grad-in-forward for pair-local losses: the loss of per-sequence log-probs with the LM-head gradients formed
during the forward (3 GEMMs instead of 4).

The segments are split into loss-local groups (a preference pair), the groups into chunks of whole groups whose
logits fit ``keep_logits_bytes``. Per chunk: one forward sweep (keeping the chunk's logits), the per-segment sums,
``loss_fn`` on each group with autograd on leaf copies of its log-probs only (``d loss / d seq_logp``), then one
backward sweep that turns the kept logits into the head's gradients, accumulated over chunks. The returned loss
hands those stored gradients out on backward (:class:`_StoredGradLoss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fastdpo._deprecation import renamed
from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import (
    check_float,
    check_index,
    check_same_device,
    refuse_double_backward,
    warn_nonfinite_output,
)
from fastdpo.head.checks import _check_inputs
from fastdpo.head.gather import _enter, _gather_bias, _gather_weight
from fastdpo.head.options import advertise_head_keywords, head_keywords
from fastdpo.head.plan import DEFAULT_GIF_LOGITS_BYTES, _resolve
from fastdpo.head.sweeps import _backward_sweep, _forward_sweep, _Kept
from fastdpo.head.tiles import _outputs_from_fold
from fastdpo.segments import segment_counts, segment_sum

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.head.options import HeadOptionKeywords

__all__ = ["SegmentStats", "linear_logprobs_loss_grad_in_forward"]


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


@advertise_head_keywords(chunk_size=False)
def linear_logprobs_loss_grad_in_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    loss_fn: Callable[..., torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    groups: Sequence[torch.Tensor] | None = None,
    token_weights: torch.Tensor | None = None,
    segment_stats: bool = False,
    segment_log_sum_p2: bool = False,
    chunk_tokens: int | None = None,
    chunk_size: int | None = None,
    logits_budget_bytes: int | None = None,
    **head_options: Unpack[HeadOptionKeywords],
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
        chunk_tokens: max labelled tokens per chunk of whole groups (default: as many as ``keep_logits_bytes`` of
            fp32 logits allow; a group larger than that is processed alone and recomputes the logits it could not
            keep).
        chunk_size, logits_budget_bytes: deprecated names of ``chunk_tokens`` and ``keep_logits_bytes``
            (``DeprecationWarning``).
        head_options: the keywords of :func:`~fastdpo.head.linear_token_logprobs` other than the ``return_*`` flags
            and its ``chunk_size`` (any other keyword is a ``TypeError``), with two differences:
            ``token_tile`` / ``vocab_tile`` are the projection tile inside each chunk, and ``keep_logits_bytes`` the
            logits of one chunk kept from the forward sweep for its backward sweep (default
            ``DEFAULT_GIF_LOGITS_BYTES``; 0 keeps none and recomputes every tile). ``validate`` also checks that
            every segment id lies in ``[0, num_segments)`` (one sync); with ``validate=False`` a token whose segment
            id lies outside belongs to no segment (no log-prob, no gradient).

    Returns:
        ``(loss, seq_logps)``: ``loss`` a 0-dim fp32 tensor whose backward multiplies the stored gradients by the
        incoming gradient (on every backward of a graph kept with ``retain_graph=True``; they are freed with the
        graph's saved tensors); ``seq_logps`` ``[S]`` fp32, detached. Without gradients to form (under
        ``torch.no_grad()`` / ``torch.inference_mode()``, or nothing requires grad) only the loss is computed.
    """
    where = "linear_logprobs_loss_grad_in_forward"
    chunk_tokens = renamed(where, "chunk_size", chunk_size, "chunk_tokens", chunk_tokens)
    keep = head_options.pop("keep_logits_bytes", None)
    head_options["keep_logits_bytes"] = renamed(
        where, "logits_budget_bytes", logits_budget_bytes, "keep_logits_bytes", keep
    )
    options, _ = head_keywords(where, head_options)
    with _enter(options.gather_context):
        _check_inputs(hidden, weight, labels, bias, options)
        _check_grad_in_forward_inputs(
            hidden, labels, segment_ids, num_segments, loss_fn, token_weights, chunk_tokens, options.validate
        )
        budget = options.keep_bytes(DEFAULT_GIF_LOGITS_BYTES)
        device = hidden.device
        resolved = _resolve(options.backend, hidden)
        vocab, d = weight.shape[0], weight.shape[1]
        plan = _plan_groups(groups, num_segments)
        lab = labels.to(torch.int64)
        toks = _tokens_by_segment(lab, segment_ids, num_segments, options.ignore_index)
        max_tokens = chunk_tokens if chunk_tokens is not None else max(1, budget // (4 * vocab))
        chunks = _chunk_groups(plan, toks.counts, max_tokens)

        need_h = hidden.requires_grad and torch.is_grad_enabled()
        need_w = weight.requires_grad and torch.is_grad_enabled()
        need_b = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        need_grad = need_h or need_w or need_b
        acc = accumulate_dtype(hidden.dtype)
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
                seg_list = [s for gi in chunk for s in plan.ids[gi]]
                rows, local_seg = _chunk_rows(toks, seg_list, device)
                n = rows.shape[0]
                hc = h_all.index_select(0, rows).contiguous()
                labc = lab.index_select(0, rows).contiguous()
                spec = options.spec(n, vocab, device, resolved)
                kept = _Kept(budget)
                st = _forward_sweep(hc, w, b, labc, spec, segment_stats and segment_log_sum_p2, False, kept)
                lse, logp, _, log_sum_p2, _, _ = _outputs_from_fold(st, labc, vocab)
                n_seg = len(seg_list)
                logp = logp.float()
                wc = None if token_weights is None else token_weights.index_select(0, rows).float()
                seq_chunk = segment_sum(
                    logp if wc is None else logp * wc, local_seg, n_seg, validate=False, backend=options.backend
                )
                seq_logps[torch.tensor(seg_list, dtype=torch.int64, device=device)] = seq_chunk
                stats_chunk = None
                if segment_stats:
                    stats_chunk = SegmentStats(
                        segment_sum(logp, local_seg, n_seg, validate=False, backend=options.backend),
                        None
                        if log_sum_p2 is None
                        else segment_sum(log_sum_p2.float(), local_seg, n_seg, validate=False, backend=options.backend),
                    )
                dseq, dplain = _chunk_loss(loss_fn, plan, chunk, seq_chunk, stats_chunk, need_grad, total_loss)
                if not need_grad or n == 0:
                    continue
                g = dseq.index_select(0, local_seg)
                if wc is not None:
                    g = g * wc
                if stats_chunk is not None:
                    g = g + dplain.index_select(0, local_seg)
                gh_c, _, _ = _backward_sweep(hc, w, b, labc, lse, g, spec, kept, need_h, need_w, need_b, grad_w, grad_b)
                if need_h:
                    assert grad_h is not None and gh_c is not None
                    grad_h.index_copy_(0, rows, gh_c)

        grads = (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(w_full.dtype),
            None if grad_b is None or b_full is None else grad_b.to(b_full.dtype),
        )
        if need_grad:
            loss = _StoredGradLoss.apply(total_loss, hidden, w_full, b_full, grads)
        else:
            loss = total_loss
        if options.validate:
            warn_nonfinite_output(seq_logps, "hidden states or weight")
        return loss, seq_logps


def _check_grad_in_forward_inputs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    loss_fn: Callable[..., torch.Tensor],
    token_weights: torch.Tensor | None,
    chunk_tokens: int | None,
    validate: bool,
) -> None:
    """The checks of grad-in-forward's own arguments (the head's are :func:`~fastdpo.head.checks._check_inputs`)."""
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
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be an int >= 1 (tokens per chunk of groups), got {chunk_tokens!r}")
    if token_weights is not None:
        check_float("token_weights", token_weights)
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights must have shape {list(labels.shape)}, got {list(token_weights.shape)}")
        check_same_device(labels=labels, token_weights=token_weights)


class _Groups(NamedTuple):
    """Segment ids (python ints) per group: the loss groups first, then one loss-free group per segment that is in
    no loss group (it still gets its log-prob)."""

    ids: list[list[int]]
    n_loss: int


def _plan_groups(groups: Sequence[torch.Tensor] | None, num_segments: int) -> _Groups:
    """Check the caller's ``groups`` (ids in ``[0, num_segments)``, each segment in one group at most) and list them
    as python ints (host-side bookkeeping: one sync per group)."""
    ids_per_group: list[list[int]] = []
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
        ids_per_group.append(ids)
    n_loss = len(ids_per_group)
    rest = (~seen).nonzero().squeeze(1).tolist()
    ids_per_group.extend([[s] for s in rest])
    return _Groups(ids_per_group, n_loss)


class _SegmentTokens(NamedTuple):
    """The labelled tokens of each segment, in token order: segment ``s`` owns ``rows[starts[s]:starts[s + 1]]``
    (``counts[s]`` tokens)."""

    rows: torch.Tensor
    counts: list[int]
    starts: list[int]


def _tokens_by_segment(
    labels: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, ignore_index: int
) -> _SegmentTokens:
    """Token lists per segment (labelled tokens only). A token whose segment id lies outside ``[0, num_segments)``
    (unvalidated input) belongs to no segment, as in :func:`~fastdpo.segments.segment_sum`."""
    seg64 = segment_ids.to(torch.int64)
    valid_idx = ((labels != ignore_index) & (seg64 >= 0) & (seg64 < num_segments)).nonzero().squeeze(1)
    vseg = seg64.index_select(0, valid_idx)
    order = torch.sort(vseg, stable=True).indices
    counts = segment_counts(vseg, num_segments).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return _SegmentTokens(valid_idx.index_select(0, order), counts, starts)


def _chunk_groups(plan: _Groups, counts: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups packed into chunks of at most ``max_tokens`` labelled tokens (a larger group is a chunk of
    its own); each chunk is a list of group indices."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for gi, ids in enumerate(plan.ids):
        ntok = sum(counts[s] for s in ids)
        if cur and cur_tokens + ntok > max_tokens:
            chunks.append(cur)
            cur, cur_tokens = [], 0
        cur.append(gi)
        cur_tokens += ntok
    if cur:
        chunks.append(cur)
    return chunks


def _chunk_rows(toks: _SegmentTokens, seg_list: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, local_seg)`` of a chunk: its tokens' indices into the batch and each token's position in
    ``seg_list`` (``[n]`` int64 each; ``local_seg`` is built on the host, then moved)."""
    parts = [toks.rows[toks.starts[s] : toks.starts[s + 1]] for s in seg_list]
    rows = torch.cat(parts) if parts else toks.rows[:0]
    local_seg = torch.cat([torch.full((toks.counts[s],), k, dtype=torch.int64) for k, s in enumerate(seg_list)]).to(
        device
    )
    return rows, local_seg


def _chunk_loss(
    loss_fn: Callable[..., torch.Tensor],
    plan: _Groups,
    chunk: list[int],
    seq_chunk: torch.Tensor,
    stats_chunk: SegmentStats | None,
    need_grad: bool,
    total_loss: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``loss_fn`` on each loss group of one chunk, adding each group's loss to ``total_loss`` (0-dim fp32, in
    place); returns ``(d loss / d seq_logp, d loss / d SegmentStats.logp_sum)`` ``[s]`` fp32 per chunk segment.

    Autograd runs on leaf copies of the group's sums only (no graph reaches the head); without gradients to form
    (``need_grad`` false: no_grad / inference_mode, or nothing requires grad) only the loss is computed."""
    device = seq_chunk.device
    n_seg = seq_chunk.shape[0]
    dseq = torch.zeros(n_seg, dtype=torch.float32, device=device)
    dplain = torch.zeros(n_seg, dtype=torch.float32, device=device)
    k0 = 0
    for gi in chunk:
        ids = plan.ids[gi]
        k1 = k0 + len(ids)
        if gi < plan.n_loss:
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
    return dseq, dplain
