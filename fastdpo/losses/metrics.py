"""TRL's metric names (one place) and the reward metrics of a batch of pairs.

Names as TRL 1.16 logs them (``LOSSES.md``): ``rewards/chosen`` = mean ``beta*c``, ``rewards/rejected`` = mean
``beta*r``, ``rewards/accuracies`` = mean ``1[beta*c > beta*r]``, ``rewards/margins`` = mean ``beta*(c - r)``,
``logps/chosen`` / ``logps/rejected`` = mean policy log-probs (``c``, ``r``: policy minus reference log-probs);
the token metrics ``logits/chosen``, ``logits/rejected``, ``entropy``, ``mean_token_accuracy`` come from the fused
head's statistics (:func:`fastdpo.engine.token_metrics`).
"""

from __future__ import annotations

import torch

REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
LOGITS_CHOSEN = "logits/chosen"
LOGITS_REJECTED = "logits/rejected"
ENTROPY = "entropy"
MEAN_TOKEN_ACCURACY = "mean_token_accuracy"
NUM_TOKENS = "num_tokens"
NLL_LOSS = "nll_loss"
LOG_ODDS_RATIO = "log_odds_ratio"
LOG_ODDS_CHOSEN = "log_odds_chosen"
KL = "kl"

REWARD_METRICS: tuple[str, ...] = (
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    REWARDS_ACCURACIES,
    REWARDS_MARGINS,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
)
"""The per-pair metrics of :func:`dpo_metrics`, in TRL's order."""

TOKEN_METRICS: tuple[str, ...] = (LOGITS_CHOSEN, LOGITS_REJECTED, ENTROPY, MEAN_TOKEN_ACCURACY)
"""The token-level metrics of the engine (from the fused head's no-grad statistics)."""

TRL_METRIC_ORDER: tuple[str, ...] = (
    ENTROPY,
    NUM_TOKENS,
    LOGITS_CHOSEN,
    LOGITS_REJECTED,
    MEAN_TOKEN_ACCURACY,
    *REWARD_METRICS,
)
"""The order in which TRL 1.16's ``DPOTrainer`` records its metrics (``num_tokens`` is a running total)."""


def dpo_metrics(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None, beta: float
) -> dict[str, torch.Tensor]:
    """TRL's reward/log-prob metrics (:data:`REWARD_METRICS`, detached 0-dim tensors) from per-pair log-probs ``[P]``
    (reference ``None``: taken as 0)."""
    with torch.no_grad():
        pc = pc.detach()
        pr = pr.detach()
        c = pc - rc.detach() if rc is not None else pc
        r = pr - rr.detach() if rr is not None else pr
        chosen_rewards = beta * c
        rejected_rewards = beta * r
        return {
            REWARDS_CHOSEN: chosen_rewards.mean(),
            REWARDS_REJECTED: rejected_rewards.mean(),
            REWARDS_ACCURACIES: (chosen_rewards > rejected_rewards).to(c.dtype).mean(),
            REWARDS_MARGINS: (chosen_rewards - rejected_rewards).mean(),
            LOGPS_CHOSEN: pc.mean(),
            LOGPS_REJECTED: pr.mean(),
        }
