"""The Liger drop-in surface added for issue 18 (item 6), checked without the network: the fused KTO module against a
float64 reference and Liger 0.8.5's module, ORPO's ``nll_target``, the functional forms, Liger's error wording."""

from __future__ import annotations

import pytest
import torch

from fastdpo.functional import (
    FusedLinearDPOFunction,
    fused_linear_cpo,
    fused_linear_dpo,
    fused_linear_kto,
    fused_linear_orpo,
    fused_linear_simpo,
)
from fastdpo.nn import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)

D64 = torch.float64


def _rows(b: int, t: int, d: int, v: int, seed: int, dtype=torch.float32, ignore: int = -100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(v, generator=g, dtype=dtype) * 0.1
    xr = x + 0.2 * torch.randn(x.shape, generator=g, dtype=dtype)
    wr = w + 0.05 * torch.randn(w.shape, generator=g, dtype=dtype)
    target = torch.randint(0, v, (b, t), generator=g)
    target[torch.rand(b, t, generator=g) < 0.3] = ignore
    target[1] = ignore  # a row without target tokens
    return x, w, bias, xr, wr, target


def _kto_reference(x, w, bias, xr, wr, target, labels, kl, beta, average, dt=D64):
    """KTO from full logits in ``dt`` (TRL's KTOTrainer formula, Liger's reduction): the naive path."""

    def logps(xx, ww, bb):
        lp = torch.log_softmax(xx.to(dt) @ ww.to(dt).T + (bb.to(dt) if bb is not None else 0), -1)
        mask = target != -100
        tok = lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        s = tok.sum(-1)
        return s / mask.sum(-1).clamp(min=1) if average else s

    r = logps(x, w, bias) - logps(xr, wr, None).detach()
    z = (r - kl.to(dt)) * torch.where(labels, 1.0, -1.0).to(dt)
    return (1 - torch.sigmoid(beta * z)).sum() / x.shape[0], r


@pytest.mark.parametrize("average", [False, True])
def test_kto_matches_float64_and_is_no_worse_than_naive(average):
    x, w, bias, xr, wr, target = _rows(5, 9, 24, 301, seed=2)
    labels = torch.tensor([True, False, True, True, False])
    kl = torch.tensor([0.7])
    beta = 0.3
    leaves64 = [t.double().requires_grad_(True) for t in (x, w, bias)]
    want, r = _kto_reference(*leaves64, xr, wr, target, labels, kl, beta, average)
    want.backward()
    naive32 = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    naive, _ = _kto_reference(*naive32, xr, wr, target, labels, kl, beta, average, dt=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    module = FusedLinearKTOLoss(beta=beta, use_ref_model=True, average_log_prob=average)
    loss, aux = module(leaves[0], leaves[1], target, leaves[2], labels, xr, wr, None, kl)
    loss.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-7)
    for got, ref in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)
    # aux: sums over desirable / undesirable rows
    logps = r.detach() + 0  # reward = beta * logratio
    torch.testing.assert_close(aux[4].double(), (beta * logps[labels]).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux[5].double(), (beta * logps[~labels]).sum(), rtol=1e-5, atol=1e-6)
    logits = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(aux[2].double(), logits[labels].sum(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(aux[3].double(), logits[~labels].sum(), rtol=1e-5, atol=1e-3)
    assert float((loss.detach().double() - want).abs()) <= float((naive.detach().double() - want).abs()) + 1e-7


def test_kto_matches_liger_and_functional():
    liger_kto = pytest.importorskip("liger_kernel.chunked_loss.kto_loss")
    x, w, bias, xr, wr, target = _rows(4, 7, 16, 97, seed=5)
    target[1] = 3  # Liger returns NaN for a row without tokens under average_log_prob; give it one
    labels = torch.tensor([True, False, False, True])

    def run(fn):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, aux = fn(xx, ww)
        loss.backward()
        return [loss.detach(), *[a.detach() for a in aux], xx.grad, ww.grad]

    ours = run(lambda xx, ww: FusedLinearKTOLoss(beta=0.2, use_ref_model=True)(xx, ww, target, bias, labels, xr, wr))
    theirs = run(
        lambda xx, ww: liger_kto.LigerFusedLinearKTOLoss(beta=0.2, use_ref_model=True, compiled=False)(
            xx, ww, target, bias, labels, xr, wr
        )
    )
    functional = run(lambda xx, ww: fused_linear_kto(xx, ww, target, labels, bias, xr, wr, None, None, -100, 0.2))
    for a, b, c in zip(ours, theirs, functional, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_kto_validation():
    x, w, bias, _, _, target = _rows(3, 5, 8, 31, seed=1)
    module = FusedLinearKTOLoss()
    with pytest.raises(ValueError, match="preference_labels"):
        module(x, w, target, bias)
    with pytest.raises(ValueError, match="preference_labels"):
        module(x, w, target, bias, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="ref_input"):
        FusedLinearKTOLoss(use_ref_model=True)(x, w, target, bias, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="kl"):
        module(x, w, target, bias, torch.tensor([True, False, True]), kl=torch.zeros(2))


def test_orpo_nll_target_scores_other_labels():
    """Liger's nll_target: the NLL term uses its labels (every non-ignored position of the chosen rows)."""
    x, w, bias, _, _, target = _rows(4, 6, 16, 89, seed=7)
    target[1] = 5  # no empty rows for the odds ratio
    g = torch.Generator().manual_seed(1)
    nll_target = torch.randint(0, 89, target.shape, generator=g)
    nll_target[0, :2] = -100
    leaves = [t.double().requires_grad_(True) for t in (x, w, bias)]
    lp = torch.log_softmax(leaves[0] @ leaves[1].T + leaves[2], -1)
    mask = nll_target[:2] != -100
    nll = -(lp[:2].gather(-1, nll_target[:2].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    no_nll = FusedLinearORPOLoss(beta=0.3, compute_nll_loss=False)
    xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, bias))
    ratio_loss, _ = no_nll(ww, xx, target, bb)
    with_nll = FusedLinearORPOLoss(beta=0.3)
    for grad_in_forward in (False, True):
        with_nll.grad_in_forward = grad_in_forward
        loss, aux = with_nll(w, x, target, bias, nll_target=nll_target)
        torch.testing.assert_close(loss.double(), ratio_loss.double() + nll.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(aux[4].double(), nll.detach(), rtol=1e-6, atol=1e-6)
    # and it trains on them: gradients of the nll_target term against float64
    xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, bias))
    (with_nll(ww, xx, target, bb, nll_target=nll_target)[0] - no_nll(ww, xx, target, bb)[0]).backward()
    nll.backward()
    torch.testing.assert_close(xx.grad.double(), leaves[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ww.grad.double(), leaves[1].grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nll_target"):
        with_nll(w, x, target, bias, nll_target=nll_target[:, :-1])


def test_functional_forms_equal_the_modules():
    x, w, bias, xr, wr, target = _rows(4, 6, 16, 89, seed=3)
    target[1] = 5
    cases = [
        (
            lambda: fused_linear_dpo(
                x, w, target, bias, xr, wr, None, -100, 0.2, True, True, True, False, 1, "hinge", 0.0, 0.05, 0.7
            ),
            lambda: FusedLinearDPOLoss(beta=0.2, alpha=0.7, compute_nll_loss=True, loss_type="hinge")(
                w, x, target, bias, xr, wr, None
            ),
        ),
        (
            lambda: fused_linear_cpo(x, w, target, bias, -100, 0.2, 0.5, 0.1),
            lambda: FusedLinearCPOLoss(beta=0.2, alpha=0.5, label_smoothing=0.1)(w, x, target, bias),
        ),
        (
            lambda: fused_linear_simpo(x, w, target, None, -100, 0.2, 1.0, 0.0, True, True, 0.3),
            lambda: FusedLinearSimPOLoss(beta=0.2, gamma=0.3, compute_nll_loss=True)(w, x, target),
        ),
        (
            lambda: fused_linear_orpo(x, w, target, bias, -100, 0.2),
            lambda: FusedLinearORPOLoss(beta=0.2)(w, x, target, bias),
        ),
    ]
    for functional, module in cases:
        (a, aux_a), (b, aux_b) = functional(), module()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for u, v in zip(aux_a, aux_b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert fused_linear_dpo is FusedLinearDPOFunction.apply


def test_liger_error_wording():
    with pytest.raises(ValueError, match="Unsupported loss_type: nope"):
        FusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing must be > 0 for loss_type='exo_pair'"):
        FusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0\.0, 0\.5\) for loss_type='robust'"):
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=-0.1)
    assert FusedLinearDPOLoss(loss_type="ipo").loss_type == "ipo"  # TRL's types beyond Liger's stay accepted
