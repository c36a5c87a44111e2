"""``DPOLoss``: :func:`fastdpo.losses.preference_loss` as a ``torch.nn.Module`` over precomputed log-probs (the
configuration fixed at construction); exported by :mod:`fastdpo.nn` beside the fused drop-in modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fastdpo.losses import PreferenceLossConfig, preference_loss
from fastdpo.losses.config import config_property
from fastdpo.losses.paired import check_statistics_names, sequence_config

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.losses import LossOptions
    from fastdpo.losses.paired import PairStatistics

__all__ = ["DPOLoss"]


class DPOLoss(torch.nn.Module):
    """:func:`fastdpo.losses.preference_loss` as a module: the configuration is fixed (and validated) at construction.

    ``forward(policy_chosen_logps [P], policy_rejected_logps [P], ref_chosen_logps [P] | None = None,
    ref_rejected_logps [P] | None = None, **per_batch)`` -> ``(loss, metrics)``, where ``per_batch`` are the
    per-batch tensors of :func:`~fastdpo.losses.preference_loss` (:class:`~fastdpo.losses.paired.PairStatistics`:
    ``chosen_lengths``, ``rejected_lengths``, ``policy_chosen_nll_sum``, ``wpo_chosen_weights``, ...).

    The configuration is a :class:`~fastdpo.losses.PreferenceLossConfig` (``loss_config=``, without ``ld_alpha``) or
    its fields as keywords (:class:`~fastdpo.losses.LossOptions`; ``loss_type`` may also come first, positionally:
    ``DPOLoss("ipo", beta=0.2)``), combined by :meth:`~fastdpo.losses.PreferenceLossConfig.resolve` (a keyword
    given with ``loss_config`` must agree with it) and kept as ``self.loss_config``. ``validate``: warn when the loss
    or a metric is NaN/inf (one host sync per call), as :func:`~fastdpo.losses.preference_loss`.
    """

    def __init__(
        self,
        loss_type: str | Sequence[str] | None = None,
        /,
        *,
        validate: bool = True,
        loss_config: PreferenceLossConfig | None = None,
        **loss_options: Unpack[LossOptions],
    ) -> None:
        super().__init__()
        if loss_type is not None:
            if "loss_type" in loss_options:
                raise TypeError("DPOLoss() got multiple values for argument 'loss_type'")
            loss_options["loss_type"] = loss_type
        config = sequence_config(PreferenceLossConfig.resolve(loss_config, loss_options, where="DPOLoss()"))
        self.loss_config = config
        self.validate = bool(validate)

    # the configuration's fields, read-only (the configuration is fixed at construction)
    loss_types = config_property("loss_type")
    loss_weights = config_property("loss_weights")
    beta = config_property("beta")
    label_smoothing = config_property("label_smoothing")
    f_divergence_type = config_property("f_divergence_type")
    f_alpha_divergence_coef = config_property("f_alpha_divergence_coef")
    discopop_tau = config_property("discopop_tau")
    use_weighting = config_property("use_weighting")

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        **per_batch: Unpack[PairStatistics],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_statistics_names(per_batch, "DPOLoss.forward()")
        return preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_config=self.loss_config,
            validate=self.validate,
            **per_batch,
        )

    def extra_repr(self) -> str:
        return f"loss_type={list(self.loss_types)}, loss_weights={list(self.loss_weights)}, beta={self.beta}"
