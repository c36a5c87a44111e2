"""Preference losses on per-sequence log-probabilities, with TRL 1.16 semantics and TRL's metric names.

Modules (everything public is re-exported here):

* :mod:`~fastdpo.losses.config` -- :class:`PreferenceLossConfig` (one validated loss configuration; its fields as
  keywords: :class:`LossOptions`), the loss-type tables and :func:`is_pair_local`;
* :mod:`~fastdpo.losses.paired` -- the paired DPO zoo of TRL's ``DPOTrainer``: :func:`preference_loss`,
  :func:`dpo_loss_sum`, :func:`f_divergence_scores`;
* :mod:`~fastdpo.losses.reference_free` -- SimPO, CPO, ORPO and their per-pair terms;
* :mod:`~fastdpo.losses.kto` -- unpaired KTO;
* :mod:`~fastdpo.losses.token_weights` -- WPO sequence weights and LD-DPO sums from per-token log-probs;
* :mod:`~fastdpo.losses.metrics` -- TRL's metric names and :func:`dpo_metrics`.

Formulas: ``LOSSES.md``. Loss arithmetic runs in float32 (float64 stays float64).
"""

from __future__ import annotations

from fastdpo.losses.config import (
    BATCH_COUPLED_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LENGTH_LOSS_TYPES,
    LOSS_TYPES,
    LossOptions,
    PreferenceLossConfig,
    check_label_smoothing,
    is_pair_local,
    normalize_loss_config,
)
from fastdpo.losses.kto import kto_loss, kto_sample_losses
from fastdpo.losses.metrics import dpo_metrics
from fastdpo.losses.paired import dpo_loss_sum, f_divergence_scores, partial_preference_loss, preference_loss
from fastdpo.losses.reference_free import (
    cpo_loss,
    cpo_pair_losses,
    log1mexp,
    orpo_log_odds,
    orpo_loss,
    orpo_pair_losses,
    simpo_loss,
    simpo_pair_losses,
)
from fastdpo.losses.token_weights import ld_logps, ld_token_weights, wpo_weights

__all__ = [
    "BATCH_COUPLED_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LABEL_SMOOTHING_LOSS_TYPES",
    "LENGTH_LOSS_TYPES",
    "LOSS_TYPES",
    "LossOptions",
    "PreferenceLossConfig",
    "check_label_smoothing",
    "cpo_loss",
    "cpo_pair_losses",
    "dpo_loss_sum",
    "dpo_metrics",
    "f_divergence_scores",
    "is_pair_local",
    "kto_loss",
    "kto_sample_losses",
    "ld_logps",
    "ld_token_weights",
    "log1mexp",
    "normalize_loss_config",
    "orpo_log_odds",
    "orpo_loss",
    "orpo_pair_losses",
    "partial_preference_loss",
    "preference_loss",
    "simpo_loss",
    "simpo_pair_losses",
    "wpo_weights",
]
