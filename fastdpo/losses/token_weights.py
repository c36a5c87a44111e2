"""Token weights the engine folds into sequence sums: WPO sequence weights and LD-DPO's length-desensitized sums.

WPO (``use_weighting``): ``w_s = exp(mean_{t in s}(log p_t - log sum_v p_v^2))`` per sequence, without gradient; a
pair's loss is multiplied by ``w_c * w_r``. LD-DPO (``ld_alpha``): a sequence's log-prob is the sum over the first
``min(|y_c|, |y_r|)`` completion tokens of its pair plus ``ld_alpha`` times the sum over the rest, for policy and
reference alike. Token inputs are flat ``[M]`` vectors with a sequence id per token (chosen of pair ``i`` = ``i``,
rejected = ``P + i``).
"""

from __future__ import annotations

import torch

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import check_float, check_index, check_same_device
from fastdpo.losses._common import check_scalar, length


def _check_token_inputs(seq_ids: torch.Tensor, **tensors: torch.Tensor) -> int:
    check_index("seq_ids", seq_ids)
    if seq_ids.dim() != 1:
        raise ValueError(f"seq_ids must be 1-D [M], got shape {list(seq_ids.shape)}")
    m = seq_ids.shape[0]
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (m,):
            raise ValueError(f"{name} must have shape [{m}] like seq_ids, got {list(t.shape)}")
    check_same_device(seq_ids=seq_ids, **tensors)
    return m


def wpo_weights(
    token_logps: torch.Tensor,
    token_log_sum_p2: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """WPO sequence weights (Eq. 2 of the WPO paper, as TRL 1.16 computes them), without gradient.

    ``w_s = exp( sum_{t in s} (log p_t - log sum_v p_v^2)_t / max(|s|, 1) )``.

    Args:
        token_logps: ``[M]`` float, the policy log-prob of each completion token (plain, not LD-weighted).
        token_log_sum_p2: ``[M]`` float, ``log sum_v p_v^2`` of the policy distribution at each of those tokens
            (``TokenStats.log_sum_p2`` of the fused head).
        seq_ids: ``[M]`` integer sequence id of each token in ``[0, num_seqs)`` (chosen of pair i = i, rejected = P+i).
        num_seqs: ``S`` (``2P``).
        validate: check that every ``seq_ids`` entry lies in ``[0, S)`` (one sync); with ``False`` a token whose id
            lies outside counts toward no sequence.

    Returns:
        ``[S]`` float32 (float64 for float64 inputs) weights, detached; a sequence with no tokens gets weight 1.
        Pass ``w[:P]``, ``w[P:]`` as ``wpo_chosen_weights``/``wpo_rejected_weights`` of :func:`preference_loss`.
    """
    from fastdpo.segments import segment_counts, segment_sum

    check_float("token_logps", token_logps)
    check_float("token_log_sum_p2", token_log_sum_p2)
    _check_token_inputs(seq_ids, token_logps=token_logps, token_log_sum_p2=token_log_sum_p2)
    with torch.no_grad():
        dtype = accumulate_dtype(token_logps.dtype)
        aligned = token_logps.detach().to(dtype) - token_log_sum_p2.detach().to(dtype)
        sums = segment_sum(aligned, seq_ids, num_seqs, validate=validate).to(dtype)
        counts = segment_counts(seq_ids, num_seqs)
        return torch.exp(sums / length(counts, dtype))


def ld_token_weights(
    token_pos: torch.Tensor,
    seq_ids: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ld_alpha: float,
    *,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """LD-DPO token weights (TRL 1.16 ``ld_alpha``): ``1`` for the first ``min(|y_c|, |y_r|)`` completion tokens of
    each pair, ``ld_alpha`` for the rest; ``[M]`` ``dtype``. ``sum_t w_t log p_t`` per sequence is :func:`ld_logps`.

    Args:
        token_pos: ``[M]`` integer 0-based index of each token within its completion (collator's ``logp_pos``).
        seq_ids: ``[M]`` integer sequence id, chosen of pair i = i, rejected of pair i = P + i.
        chosen_lengths, rejected_lengths: ``[P]`` integer completion token counts.
        ld_alpha: weight of the tokens past the shared length (TRL: in [0, 1]).
        validate: check that every ``seq_ids`` entry lies in ``[0, 2P)`` (one sync); with ``False`` a token whose
            id lies outside gets weight 1 (and counts toward no sequence in :func:`ld_logps`).
    """
    check_index("token_pos", token_pos)
    _check_token_inputs(seq_ids, token_pos=token_pos)
    check_index("chosen_lengths", chosen_lengths)
    check_index("rejected_lengths", rejected_lengths)
    if chosen_lengths.dim() != 1 or chosen_lengths.shape != rejected_lengths.shape:
        raise ValueError(
            f"chosen_lengths and rejected_lengths must both be [P], got {list(chosen_lengths.shape)} and "
            f"{list(rejected_lengths.shape)}"
        )
    check_same_device(token_pos=token_pos, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    alpha = check_scalar("ld_alpha", ld_alpha)
    p = chosen_lengths.shape[0]
    seq = seq_ids.to(torch.int64)
    inside = (seq >= 0) & (seq < 2 * p)
    if validate and seq.numel() and not bool(inside.all()):
        raise ValueError(f"seq_ids must lie in [0, {2 * p}) (2 * number of pairs)")
    shared = torch.minimum(chosen_lengths, rejected_lengths).to(torch.int64)
    if p == 0:  # no pair at all: every token lies outside (validate=False); the gather below needs one row
        shared = shared.new_zeros(1)
    pair = torch.where(inside, torch.where(seq >= p, seq - p, seq), 0)
    in_shared = (token_pos.to(torch.int64) < shared.index_select(0, pair)) | ~inside
    return torch.where(
        in_shared,
        torch.ones((), dtype=dtype, device=token_pos.device),
        torch.full((), alpha, dtype=dtype, device=token_pos.device),
    )


def ld_logps(
    token_logps: torch.Tensor,
    token_pos: torch.Tensor,
    seq_ids: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ld_alpha: float,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """LD-DPO sequence log-probs (TRL 1.16 ``ld_alpha``): the first ``min(|y_c|, |y_r|)`` completion tokens of each
    pair count fully, the rest are scaled by ``ld_alpha`` (:func:`ld_token_weights`). Use the same call for policy and
    reference.

    Args:
        token_logps: ``[M]`` float log-prob of each completion token (differentiable).
        token_pos, seq_ids, chosen_lengths, rejected_lengths, ld_alpha, validate: as :func:`ld_token_weights`.

    Returns:
        ``[2P]`` float32 (float64 for float64 input) ``[chosen..., rejected...]``, differentiable wrt token_logps.
    """
    from fastdpo.segments import segment_sum

    check_float("token_logps", token_logps)
    _check_token_inputs(seq_ids, token_logps=token_logps, token_pos=token_pos)
    check_same_device(token_logps=token_logps, chosen_lengths=chosen_lengths)
    dtype = accumulate_dtype(token_logps.dtype)
    scale = ld_token_weights(
        token_pos, seq_ids, chosen_lengths, rejected_lengths, ld_alpha, dtype=dtype, validate=validate
    )
    p = chosen_lengths.shape[0]
    return segment_sum(token_logps.to(dtype) * scale, seq_ids, 2 * p, validate=validate).to(dtype)
