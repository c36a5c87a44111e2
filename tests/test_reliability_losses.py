"""Preference losses with NaN inputs warn like the ops and propagate NaN (issue 13 item 4), and reject bad
configurations with a clear error (item 11: ``loss_type=None``, ``beta <= 0`` for ORPO / KTO and the fused modules).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastdpo import preference_loss
from fastdpo.losses import LABEL_SMOOTHING_LOSS_TYPES, LOSS_TYPES, cpo_loss, kto_loss, orpo_loss, simpo_loss
from fastdpo.nn import DPOLoss, FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss

P = 4


def _logps(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(P, generator=gen) * 20 for _ in range(4)]


def _lengths() -> dict[str, torch.Tensor]:
    return {"chosen_lengths": torch.tensor([3, 5, 2, 7]), "rejected_lengths": torch.tensor([4, 1, 6, 2])}


def _smoothing(loss_type: str) -> float:
    """label_smoothing for the loss types that read it (any other type refuses a nonzero value)."""
    return 0.1 if loss_type in LABEL_SMOOTHING_LOSS_TYPES else 0.0


def _run(fn: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("which", range(4))
def test_preference_loss_nan_input_warns_and_propagates(loss_type: str, which: int) -> None:
    args = _logps(0)
    args[which][2] = float("nan")
    kw = dict(loss_type=loss_type, label_smoothing=_smoothing(loss_type), **_lengths())
    (loss, metrics), warned = _run(lambda: preference_loss(*args, **kw))
    if loss_type == "sft" and which > 0:  # sft reads the chosen policy log-probs only; the metrics read them all
        assert torch.isfinite(loss) and any(torch.isnan(m) for m in metrics.values())
    else:
        assert torch.isnan(loss), f"{loss_type}: NaN in argument {which} gave {float(loss)}"
    assert len(warned) == 1 and "non-finite" in str(warned[0].message), warned
    assert warned[0].filename == __file__  # points at the caller's line
    (loss_nv, _), warned = _run(lambda: preference_loss(*args, validate=False, **kw))
    torch.testing.assert_close(loss_nv, loss, equal_nan=True, rtol=0, atol=0)
    assert not warned


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_preference_loss_finite_input_does_not_warn(loss_type: str) -> None:
    (loss, _), warned = _run(
        lambda: preference_loss(*_logps(1), loss_type=loss_type, label_smoothing=_smoothing(loss_type), **_lengths())
    )
    assert torch.isfinite(loss) and not warned


REFERENCE_FREE = {
    "simpo_loss": lambda a, **kw: simpo_loss(
        a[0], a[1], _lengths()["chosen_lengths"], _lengths()["rejected_lengths"], **kw
    ),
    "cpo_loss": lambda a, **kw: cpo_loss(a[0], a[1], _lengths()["chosen_lengths"], **kw),
    "orpo_loss": lambda a, **kw: orpo_loss(
        a[0], a[1], _lengths()["chosen_lengths"], _lengths()["rejected_lengths"], **kw
    ),
    "kto_loss": lambda a, **kw: kto_loss(a[0], a[2], torch.tensor([True, False, True, False]), **kw),
}


@pytest.mark.parametrize("name", list(REFERENCE_FREE))
@pytest.mark.parametrize("where", [0, 1])
def test_functional_losses_nan_input_warns_and_propagates(name: str, where: int) -> None:
    args = _logps(2)
    args[0 if where == 0 else (2 if name == "kto_loss" else 1)][1] = float("nan")
    (loss, _), warned = _run(lambda: REFERENCE_FREE[name](args))
    assert torch.isnan(loss) and len(warned) == 1 and "non-finite" in str(warned[0].message)
    (loss, _), warned = _run(lambda: REFERENCE_FREE[name](args, validate=False))
    assert torch.isnan(loss) and not warned
    (loss, _), warned = _run(lambda: REFERENCE_FREE[name](_logps(3)))
    assert torch.isfinite(loss) and not warned


def test_dpo_loss_module_warns_on_nan() -> None:
    args = _logps(4)
    args[1][0] = float("nan")
    (loss, _), warned = _run(lambda: DPOLoss()(*args))
    assert torch.isnan(loss) and len(warned) == 1
    (loss, _), warned = _run(lambda: DPOLoss(validate=False)(*args))
    assert torch.isnan(loss) and not warned


@pytest.mark.parametrize("cls", [FusedLinearDPOLoss, FusedLinearSimPOLoss, FusedLinearCPOLoss, FusedLinearORPOLoss])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_fused_modules_nan_hidden_warn_and_propagate(cls: type, grad_in_forward: bool) -> None:
    # coverage: the fused modules warn through the head's output check
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, 6, generator=gen)
    w = torch.randn(19, 6, generator=gen)
    target = torch.randint(0, 19, (4, 5), generator=gen)
    x[2, 3, 1] = float("nan")
    kw = {"ref_input": x.clone(), "ref_weight": w} if cls is FusedLinearDPOLoss else {}
    (loss, _), warned = _run(lambda: cls(grad_in_forward=grad_in_forward)(w, x, target, **kw))
    assert torch.isnan(loss) and warned and all("non-finite" in str(m.message) for m in warned)


# ---------------------------------------------------------------------------------------------------------------
# configuration errors
# ---------------------------------------------------------------------------------------------------------------


def test_loss_type_none_is_a_clear_error() -> None:
    for call in (
        lambda: preference_loss(*_logps(6), loss_type=None),  # type: ignore[arg-type]
        lambda: DPOLoss(loss_type=None),  # type: ignore[arg-type]
        lambda: FusedLinearDPOLoss(loss_type=None),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="loss_type must be a loss type name"):
            call()


@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_orpo_kto_and_fused_modules_reject_nonpositive_beta(beta: float) -> None:
    a = _logps(7)
    with pytest.raises(ValueError, match="beta > 0"):
        orpo_loss(a[0], a[1], _lengths()["chosen_lengths"], _lengths()["rejected_lengths"], beta=beta)
    with pytest.raises(ValueError, match="beta > 0"):
        kto_loss(a[0], a[2], torch.tensor([True, False, True, False]), beta=beta)
    for cls in (FusedLinearORPOLoss, FusedLinearSimPOLoss, FusedLinearCPOLoss):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            cls(beta=beta)
