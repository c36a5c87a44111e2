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

import inspect
from collections.abc import Callable

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


def _liger_apply(
    module: type[torch.nn.Module], required: tuple[str, ...], optional: tuple[str, ...], **defaults: object
) -> Callable[..., Output]:
    """An ``apply(*required, *optional)`` taking Liger's positional parameter names in Liger's order.

    A name the module's constructor takes is a constructor option (default: ``defaults`` where Liger's function
    differs from the module, else the module's); every other name goes to the module's ``forward`` by keyword
    (``weight`` as ``lin_weight``; default: ``forward``'s). Calling ``apply`` builds the module and calls it.
    """
    options = inspect.signature(module.__init__).parameters
    inputs = inspect.signature(module.forward).parameters

    def parameter(name: str, is_required: bool) -> inspect.Parameter:
        own = options.get(name) or inputs["lin_weight" if name == "weight" else name]
        default = inspect.Parameter.empty if is_required else defaults.get(name, own.default)
        return own.replace(name=name, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)

    signature = inspect.Signature(
        [parameter(n, True) for n in required] + [parameter(n, False) for n in optional], return_annotation="Output"
    )

    def apply(*args: object, **kwargs: object) -> Output:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        built = module(**{n: v for n, v in arguments.items() if n in options})
        return built(**{("lin_weight" if n == "weight" else n): v for n, v in arguments.items() if n not in options})

    apply.__signature__ = signature  # type: ignore[attr-defined]
    apply.__name__ = apply.__qualname__ = "apply"
    apply.__module__ = __name__
    return apply


_TENSORS = ("_input", "weight", "target")


class FusedLinearDPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearDPOFunction.apply`` (``alpha`` last, as Liger)."""

    apply = staticmethod(
        _liger_apply(
            FusedLinearDPOLoss,
            _TENSORS,
            ("bias", "ref_input", "ref_weight", "ref_bias", "ignore_index", "beta", "compute_nll_loss", "compiled")
            + ("use_ref_model", "average_log_prob", "chunk_size", "loss_type", "label_smoothing", "discopop_tau")
            + ("alpha",),
        )
    )


class FusedLinearCPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearCPOFunction.apply``."""

    apply = staticmethod(
        _liger_apply(
            FusedLinearCPOLoss,
            _TENSORS,
            ("bias", "ignore_index", "beta", "alpha", "label_smoothing", "compute_nll_loss", "compiled")
            + ("average_log_prob", "chunk_size"),
        )
    )


class FusedLinearSimPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearSimPOFunction.apply`` (``compute_nll_loss`` off by
    default there, unlike the module)."""

    apply = staticmethod(
        _liger_apply(
            FusedLinearSimPOLoss,
            _TENSORS,
            ("bias", "ignore_index", "beta", "alpha", "label_smoothing", "compute_nll_loss", "compiled", "gamma")
            + ("chunk_size",),
            compute_nll_loss=False,
        )
    )


class FusedLinearORPOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearORPOFunction.apply``."""

    apply = staticmethod(
        _liger_apply(
            FusedLinearORPOLoss,
            _TENSORS,
            ("bias", "ignore_index", "beta", "compute_nll_loss", "nll_target", "compiled", "chunk_size"),
        )
    )


class FusedLinearKTOFunction:
    """``apply`` with the arguments of Liger's ``LigerFusedLinearKTOFunction.apply`` (``use_ref_model`` on by
    default there, unlike the module)."""

    apply = staticmethod(
        _liger_apply(
            FusedLinearKTOLoss,
            (*_TENSORS, "preference_labels"),
            ("bias", "ref_input", "ref_weight", "ref_bias", "kl", "ignore_index", "beta", "compiled", "use_ref_model")
            + ("average_log_prob", "chunk_size"),
            use_ref_model=True,
        )
    )


fused_linear_dpo = FusedLinearDPOFunction.apply
fused_linear_cpo = FusedLinearCPOFunction.apply
fused_linear_simpo = FusedLinearSimPOFunction.apply
fused_linear_orpo = FusedLinearORPOFunction.apply
fused_linear_kto = FusedLinearKTOFunction.apply
