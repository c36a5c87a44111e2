"""Liger-style functional forms of the fused preference losses.

Liger 0.8.5 exposes each chunked loss also as ``LigerFusedLinear*Function.apply(_input, weight, target, ...)`` (an
autograd function called with Liger's positional argument order) and as ``liger_fused_linear_*`` (the same
``apply``) in ``liger_kernel.chunked_loss.functional``. The classes here take the same positional and keyword
arguments in the same order and return the same ``(loss, aux)``; ``apply`` builds the matching module of
:mod:`fastdpo.nn` / :mod:`fastdpo.fused_kto` with those options and calls it, so gradients flow through the module's
own autograd (``loss.backward()`` fills ``_input.grad``, ``weight.grad``, ``bias.grad``). Migration::

    from fastdpo.functional import fused_linear_dpo   # was: from liger_kernel.chunked_loss.functional import ...
    loss, aux = fused_linear_dpo(_input, weight, target, bias, ref_input, ref_weight, ref_bias, -100, 0.1)
"""

from __future__ import annotations

import torch

from fastdpo.fused_kto import FusedLinearKTOLoss
from fastdpo.nn import FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss

__all__ = [
    "FusedLinearCPOFunction",
    "FusedLinearDPOFunction",
    "FusedLinearKTOFunction",
    "FusedLinearORPOFunction",
    "FusedLinearSimPOFunction",
    "fused_linear_cpo",
    "fused_linear_dpo",
    "fused_linear_kto",
    "fused_linear_orpo",
    "fused_linear_simpo",
]

Output = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


class FusedLinearDPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearDPOFunction.apply`` (``alpha`` last, as Liger)."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        alpha: float = 1.0,
    ) -> Output:
        module = FusedLinearDPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
            chunk_size=chunk_size,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
        )
        return module(weight, _input, target, bias, ref_input, ref_weight, ref_bias)


class FusedLinearCPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearCPOFunction.apply``."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ) -> Output:
        module = FusedLinearCPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            average_log_prob=average_log_prob,
            chunk_size=chunk_size,
        )
        return module(weight, _input, target, bias)


class FusedLinearSimPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearSimPOFunction.apply``."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ) -> Output:
        module = FusedLinearSimPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            gamma=gamma,
            chunk_size=chunk_size,
        )
        return module(weight, _input, target, bias)


class FusedLinearORPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearORPOFunction.apply``."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        nll_target: torch.Tensor | None = None,
        compiled: bool = True,
        chunk_size: int = 1,
    ) -> Output:
        module = FusedLinearORPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            chunk_size=chunk_size,
        )
        return module(weight, _input, target, bias, nll_target=nll_target)


class FusedLinearKTOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearKTOFunction.apply``."""

    @staticmethod
    def apply(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        preference_labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ) -> Output:
        module = FusedLinearKTOLoss(
            ignore_index=ignore_index,
            beta=beta,
            compiled=compiled,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
            chunk_size=chunk_size,
        )
        return module(_input, weight, target, bias, preference_labels, ref_input, ref_weight, ref_bias, kl)


fused_linear_dpo = FusedLinearDPOFunction.apply
fused_linear_cpo = FusedLinearCPOFunction.apply
fused_linear_simpo = FusedLinearSimPOFunction.apply
fused_linear_orpo = FusedLinearORPOFunction.apply
fused_linear_kto = FusedLinearKTOFunction.apply
