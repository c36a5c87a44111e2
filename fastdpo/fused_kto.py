"""Fused LM-head KTO loss: a drop-in for Liger 0.8.5's ``LigerFusedLinearKTOLoss`` (unpaired preferences).

KTO (Ethayarajh et al. 2024) scores single completions labelled desirable or undesirable, so the rows are not
paired as in :mod:`fastdpo.nn`: ``_input [B, T, D]``, ``target [B, T]`` and ``preference_labels [B]`` (bool, True =
desirable). Per row ``r = log pi(y) - log pi_ref(y)`` (summed, or averaged with ``average_log_prob``, over the
positions whose target is not ``ignore_index``; ``r = log pi(y)`` without a reference) and, with the KL estimate
``kl`` (a tensor broadcastable to ``[B]``, computed by the caller as TRL's ``KTOTrainer`` does; none: 0)::

    desirable:   1 - sigmoid(beta * (r - kl))
    undesirable: 1 - sigmoid(beta * (kl - r))
    loss = sum over rows / B

Only the target positions reach the head and the logits sums Liger reports are computed by linearity, so no
``[B, T, V]`` logits exist (:mod:`fastdpo.fused_base`).
Outputs as Liger's: ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
chosen_rewards_sum, rejected_rewards_sum))``, 0-dim fp32 sums over the desirable / undesirable rows (divide by the
row counts for means; the logits sums by ``count * T * V``), detached.

Differences from Liger (deliberate, as in :mod:`fastdpo.fused_base`): a row without target tokens has log-prob 0
(Liger: NaN with ``average_log_prob``); ``compiled`` and ``chunk_size`` are accepted for signature compatibility
only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastdpo._validation import check_float, check_number, check_same_device
from fastdpo.fused_base import FusedHeadModule, RowTokens, row_logit_sums
from fastdpo.losses.kto import kto_sample_losses

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.fused_base import FusedHeadKeywords

__all__ = ["FusedLinearKTOLoss"]


class FusedLinearKTOLoss(FusedHeadModule):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearKTOLoss`` (same positional constructor options and call).

    ``forward(_input [B, T, D], lin_weight [V, D], target [B, T], bias [V] = None, preference_labels [B] bool,
    ref_input [B, T, D] = None, ref_weight [V, D] = None, ref_bias [V] = None, kl = None)`` (note: ``_input`` comes
    first here, as in Liger's KTO module) -> ``(loss, aux)`` as described in :mod:`fastdpo.fused_kto`.

    Keyword-only head options: :class:`fastdpo.fused_base.FusedHeadKeywords`.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        **head_options: Unpack[FusedHeadKeywords],
    ) -> None:
        super().__init__(ignore_index, compiled, chunk_size, **head_options)
        self.beta = check_number("beta", beta)
        self.use_ref_model = bool(use_ref_model)
        self.average_log_prob = bool(average_log_prob)

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        preference_labels: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check(lin_weight, _input, target, "[B, T, D] with B > 0", nonempty=True)
        b = _input.shape[0]
        if preference_labels is None:
            raise ValueError("preference_labels ([B] bool, True = desirable) must be provided for the KTO loss")
        if (
            not isinstance(preference_labels, torch.Tensor)
            or preference_labels.dtype != torch.bool
            or preference_labels.shape != (b,)
        ):
            raise ValueError(f"preference_labels must be a bool tensor of shape [{b}]")
        if kl is not None:
            check_float("kl", kl)
            if kl.numel() not in (1, b):
                raise ValueError(f"kl must hold 1 or {b} values, got shape {list(kl.shape)}")
        self._check_ref(_input, ref_input, ref_weight)
        check_same_device(
            _input=_input,
            lin_weight=lin_weight,
            target=target,
            bias=bias,
            preference_labels=preference_labels,
            ref_input=ref_input,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            kl=kl,
        )

        rows = RowTokens(target, self.ignore_index)
        logps = self._as_loss_logps(self._row_sums(rows, _input, lin_weight, bias), rows.counts)
        logratio = logps
        if self.use_ref_model:
            assert ref_input is not None and ref_weight is not None
            with torch.no_grad():
                ref_logps = self._as_loss_logps(self._row_sums(rows, ref_input, ref_weight, ref_bias), rows.counts)
            logratio = logps - ref_logps
        z0 = kl.detach().to(logratio.dtype).reshape(-1) if kl is not None else 0.0
        loss = kto_sample_losses(logratio, z0, preference_labels, self.beta).sum() / b

        with torch.no_grad():
            want = preference_labels.to(torch.float32)
            rewards = self.beta * logratio.detach()
            row_logits = row_logit_sums(_input, lin_weight, bias)  # [B]: over positions and vocabulary
            aux = (
                (logps.detach() * want).sum(),
                (logps.detach() * (1.0 - want)).sum(),
                (row_logits * want).sum(),
                (row_logits * (1.0 - want)).sum(),
                (rewards * want).sum(),
                (rewards * (1.0 - want)).sum(),
            )
        return loss, aux
