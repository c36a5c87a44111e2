"""A :class:`fastdpo.engine.DPOEngine` step's loss and metrics from the policy's pass and the reference log-probs.

Two paths to the same loss (:func:`fastdpo.losses.preference_loss`, TRL 1.16 semantics, on ``[P]`` fp32 sequence
log-probs ``pi_c, pi_r`` of the policy and ``ref_c, ref_r`` of the reference; pair ``i`` is sequences ``i`` and
``P + i`` of the batch):

* :func:`sequence_loss`: from the policy's log-probs of :meth:`~fastdpo.engine.DPOEngine.compute_logps`, the head's
  gradient formed in backward. WPO's weights ``w = exp(mean_t (log p_t - log sum_v p_v^2))`` per sequence
  (:func:`fastdpo.losses.wpo_weights`) and LD-DPO's plain NLL sums (its ``sft`` term) come from the same pass.
* :func:`grad_in_forward_loss`: from the backbone's hidden states, the head's gradient formed during the forward
  (:func:`fastdpo.head.linear_logprobs_loss_grad_in_forward`, 3 GEMMs instead of 4). Pair-local losses
  (``config.pair_local``) are cut into one group per pair ``[i, P + i]``, each pair's term
  :func:`fastdpo.losses.partial_preference_loss` of the batch mean; batch-coupled ones run as one group of all
  ``2P`` sequences. LD-DPO enters as per-token weights of the sums, and its NLL sums and WPO's
  ``sum_t log sum_v p_v^2`` come from the head's per-group :class:`~fastdpo.head.SegmentStats`.

Metrics are TRL's names (:mod:`fastdpo.losses.metrics`): the reward metrics of :func:`fastdpo.losses.dpo_metrics`
and the token metrics (:func:`token_metrics`) from the head's no-grad statistics; every metric is a detached 0-dim
fp32 tensor (no host sync). With a gather (``accelerator.gather`` semantics, :data:`MetricGather`) they are global
over the data-parallel ranks (:func:`gathered_reward_metrics`, ``token_metrics(gather_totals=)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastdpo.engine_inputs import call_fused_head
from fastdpo.losses import dpo_metrics, ld_token_weights, partial_preference_loss, preference_loss, wpo_weights
from fastdpo.losses.config import PreferenceLossConfig
from fastdpo.losses.metrics import ENTROPY, LOGITS_CHOSEN, LOGITS_REJECTED, MEAN_TOKEN_ACCURACY
from fastdpo.models import LMParts

if TYPE_CHECKING:
    from fastdpo.head.grad_in_forward import SegmentStats

__all__ = [
    "LossInputs",
    "MetricGather",
    "gathered_reward_metrics",
    "grad_in_forward_loss",
    "sequence_loss",
    "token_metric_totals",
    "token_metrics",
]

#: all-gathers a tensor over data-parallel ranks along dim 0 (``accelerator.gather`` semantics), see DPOEngine.step
MetricGather = Callable[[torch.Tensor], torch.Tensor]

#: a grad-in-forward group's loss: ``(seq_logps [s], seg_ids [s], stats) -> 0-dim loss`` (see the head)
_GroupLoss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossInputs:
    """What a step's loss reads besides the policy's pass (the same for both paths).

    Attributes:
        batch: the collated batch (:class:`~fastdpo.collator.PreferenceCollator`): ``logp_seq`` / ``logp_pos`` /
            ``logp_labels`` ``[M]``, ``chosen_lengths`` / ``rejected_lengths`` ``[P]``.
        num_pairs: ``P``.
        ref_c, ref_r: the reference's ``[P]`` fp32 chosen / rejected log-probs.
        config: the sequence-level loss configuration (``ld_alpha=None``: LD-DPO's weighting is applied to the token
            log-probs, before the loss sees the sequence log-probs).
        ld_alpha: LD-DPO's weight of tokens beyond the shorter completion of a pair, or ``None``; when set, the NLL
            (``sft``) term takes the plain ``-sum log p`` of the sequences.
        validate: the checks of :func:`fastdpo.losses.wpo_weights` / :func:`fastdpo.losses.ld_token_weights`.
    """

    batch: Mapping[str, Any]
    num_pairs: int
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    config: PreferenceLossConfig
    ld_alpha: float | None
    validate: bool


def sequence_loss(pol: Mapping[str, Any], x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, reward metrics)`` of the policy's :meth:`~fastdpo.engine.DPOEngine.compute_logps` output ``pol``
    (LD-weighted sequence log-probs and the plain ``nll_sum`` under LD-DPO; with WPO, ``pol`` must carry the head's
    ``log_sum_p2`` token statistics)."""
    p = x.num_pairs
    extra: dict[str, Any] = {}
    if x.config.use_weighting:
        w = wpo_weights(pol["token_logps"], pol["log_sum_p2"], x.batch["logp_seq"], 2 * p, validate=x.validate)
        extra = {"wpo_chosen_weights": w[:p], "wpo_rejected_weights": w[p:]}
    if x.ld_alpha is not None:
        extra["policy_chosen_nll_sum"] = pol["nll_sum"][:p]
        extra["policy_rejected_nll_sum"] = pol["nll_sum"][p:]
    return preference_loss(
        pol["chosen_logps"],
        pol["rejected_logps"],
        x.ref_c,
        x.ref_r,
        chosen_lengths=x.batch["chosen_lengths"],
        rejected_lengths=x.batch["rejected_lengths"],
        loss_config=x.config,
        **extra,
    )


def grad_in_forward_loss(
    parts: LMParts, hidden: torch.Tensor, x: LossInputs, head_options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, policy sequence log-probs [2P])`` with the head's gradients formed in the forward.

    ``hidden``: ``[M, D]`` states of the completion tokens' predecessors (``parts``' backbone); ``head_options``: the
    fused head's tiles, temperature, backend, validation. The loss has a grad_fn that hands out the stored gradients;
    the log-probs are detached sums.
    """
    from fastdpo.head.grad_in_forward import linear_logprobs_loss_grad_in_forward
    from fastdpo.segments import pair_groups

    batch, seg = x.batch, x.batch["logp_seq"]
    token_weights = None
    if x.ld_alpha is not None:
        token_weights = ld_token_weights(
            batch["logp_pos"], seg, batch["chosen_lengths"], batch["rejected_lengths"], x.ld_alpha, validate=x.validate
        )
    if x.config.pair_local:
        loss_fn, groups = _pair_loss(x), pair_groups(x.num_pairs)
    else:  # batch-coupled (sorting over the batch, WPO-weighted SFT): one group of all sequences
        loss_fn, groups = _batch_loss(x), None
    return call_fused_head(
        parts,
        hidden,
        linear_logprobs_loss_grad_in_forward,
        batch["logp_labels"],
        seg,
        2 * x.num_pairs,
        loss_fn,
        groups=groups,
        token_weights=token_weights,
        segment_stats=x.config.use_weighting or x.ld_alpha is not None,
        segment_log_sum_p2=x.config.use_weighting,
        **head_options,
    )


def _stats_kwargs(stats: SegmentStats | None, k: int, x: LossInputs) -> dict[str, torch.Tensor]:
    """:func:`~fastdpo.losses.preference_loss` kwargs of a group's sequences (``k`` chosen first, then their
    rejected): LD-DPO's NLL sums and WPO's ``log sum p^2`` sums from the head's ``stats``."""
    if stats is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    if x.ld_alpha is not None:
        out["policy_chosen_nll_sum"] = -stats.logp_sum[:k]
        out["policy_rejected_nll_sum"] = -stats.logp_sum[k:]
    if stats.log_sum_p2_sum is not None:  # WPO
        out["policy_chosen_log_sum_p2"] = stats.log_sum_p2_sum[:k]
        out["policy_rejected_log_sum_p2"] = stats.log_sum_p2_sum[k:]
    return out


def _pair_loss(x: LossInputs) -> _GroupLoss:
    """The loss of a group ``seg_ids == [i, P + i]``: pair ``i``'s contribution to the batch-mean loss (with the
    batch totals for its mean)."""
    lengths_c, lengths_r = x.batch["chosen_lengths"], x.batch["rejected_lengths"]
    sft = "sft" in x.config.loss_type

    def loss(seq_logps: torch.Tensor, seg_ids: torch.Tensor, stats: SegmentStats | None = None) -> torch.Tensor:
        i = seg_ids[:1].to(x.ref_c.device)
        num_chosen_tokens = lengths_c.to(seq_logps.dtype).sum().clamp(min=1.0) if sft else None
        return partial_preference_loss(
            seq_logps[0:1],
            seq_logps[1:2],
            x.ref_c.index_select(0, i),
            x.ref_r.index_select(0, i),
            loss_config=x.config,
            num_pairs=x.num_pairs,
            num_chosen_tokens=num_chosen_tokens,
            chosen_lengths=lengths_c.index_select(0, i),
            rejected_lengths=lengths_r.index_select(0, i),
            **_stats_kwargs(stats, 1, x),
        )

    return loss


def _batch_loss(x: LossInputs) -> _GroupLoss:
    """The loss of one group of all ``2P`` sequences (in the head's segment order ``seg_ids``): the batch's loss."""
    from fastdpo.head.grad_in_forward import SegmentStats

    def loss(seq_logps: torch.Tensor, seg_ids: torch.Tensor, stats: SegmentStats | None = None) -> torch.Tensor:
        ids = seg_ids.to(seq_logps.device)

        def ordered(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t).index_copy(0, ids, t)

        if stats is not None:
            lsp2 = stats.log_sum_p2_sum
            stats = SegmentStats(ordered(stats.logp_sum), None if lsp2 is None else ordered(lsp2))
        value, _ = preference_loss(
            *ordered(seq_logps).split(x.num_pairs),
            x.ref_c,
            x.ref_r,
            chosen_lengths=x.batch["chosen_lengths"],
            rejected_lengths=x.batch["rejected_lengths"],
            loss_config=x.config,
            **_stats_kwargs(stats, x.num_pairs, x),
        )
        return value

    return loss


def token_metric_totals(
    logps: Mapping[str, Any], logp_seq: torch.Tensor, num_pairs: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (sum, count)}`` behind :func:`token_metrics`: detached 0-dim fp32 sums of the head's statistics over
    the selected completion tokens and the fp32 token counts (what data-parallel ranks add up before dividing)."""
    chosen = logp_seq < num_pairs
    rejected = ~chosen

    def masked_total(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.detach().float()
        total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
        return total, mask.sum().to(values.dtype)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if logps.get("mean_logit") is not None:
        out[LOGITS_CHOSEN] = masked_total(logps["mean_logit"], chosen)
        out[LOGITS_REJECTED] = masked_total(logps["mean_logit"], rejected)
    if logps.get("entropy") is not None:
        out[ENTROPY] = masked_total(logps["entropy"], torch.ones_like(chosen))
    if logps.get("argmax_hit") is not None:
        out[MEAN_TOKEN_ACCURACY] = masked_total(logps["argmax_hit"].float(), chosen)
    return out


def token_metrics(
    logps: Mapping[str, Any], logp_seq: torch.Tensor, num_pairs: int, *, gather_totals: MetricGather | None = None
) -> dict[str, torch.Tensor]:
    """TRL's token-level metrics from the head's statistics (detached 0-dim fp32 tensors, no host sync).

    ``logits/chosen`` / ``logits/rejected``: token-weighted mean over chosen / rejected completion tokens of the
    vocabulary-mean logit; ``entropy``: token-weighted mean over all completion tokens; ``mean_token_accuracy``:
    fraction of chosen completion tokens whose argmax is the label. Empty selections give 0 (as TRL).
    ``gather_totals`` (see :meth:`DPOEngine.step`) makes them token-weighted over every data-parallel rank: the
    ``[1, 2k]`` (sum, count) totals are gathered in one call and their rows summed before dividing, as TRL does.
    """
    totals = token_metric_totals(logps, logp_seq, num_pairs)
    if gather_totals is not None and totals:
        names = list(totals)
        packed = torch.stack([t for name in names for t in totals[name]]).unsqueeze(0)
        summed = gather_totals(packed).sum(0)
        totals = {name: (summed[2 * i], summed[2 * i + 1]) for i, name in enumerate(names)}
    return {name: total / count.clamp(min=1) for name, (total, count) in totals.items()}


def gathered_reward_metrics(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    gather: MetricGather,
) -> dict[str, torch.Tensor]:
    """:func:`fastdpo.losses.dpo_metrics` over every rank's pairs: the four ``[P]`` log-prob vectors are gathered as
    one ``[P, 4]`` tensor (one collective) into ``[sum P, 4]``."""
    stacked = torch.stack([t.detach().float() for t in (pol_c, pol_r, ref_c, ref_r)], dim=1)
    pc, pr, rc, rr = gather(stacked).unbind(1)
    return dpo_metrics(pc, pr, rc, rr, beta)
