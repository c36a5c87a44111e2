"""The reference-free family from their papers: SimPO, CPO, ORPO (no reference model).

Each loss is a batch mean of per-pair terms, plus (CPO, ORPO) the token-mean NLL of the chosen completions
``sum nll / sum chosen_lengths`` over the batch. The per-pair terms are public (:func:`simpo_pair_losses`,
:func:`cpo_pair_losses`, :func:`orpo_log_odds`, :func:`orpo_pair_losses`) so that the fused modules of
:mod:`fastdpo.nn` evaluate the same formula on any subset of pairs (grad-in-forward groups).

* SimPO (Meng et al. 2024, Eq. 6): ``-log sigma(beta a_w - beta a_l - gamma)``, ``a = log pi(y) / |y|``.
* CPO (Xu et al. 2024, Eq. 3-5): ``-log sigma(beta (log pi(y_w) - log pi(y_l))) + alpha * NLL(y_w)``.
* ORPO (Hong et al. 2024, Eq. 6-7): ``NLL(y_w) - beta * log sigma(log odds(y_w) - log odds(y_l))``,
  ``log odds(y) = a - log(1 - e^a)``.

``label_smoothing`` ``eps`` (SimPO, CPO) gives the conservative form ``-(1-eps) log sigma(z) - eps log sigma(-z)``
(as TRL's CPO trainer and Liger). Arithmetic in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import check_same_device
from fastdpo.losses._common import (
    check_pairs,
    check_scalar,
    check_seq_tensor,
    checked_output,
    length,
    positive_beta,
    smoothed_sigmoid,
)
from fastdpo.losses.metrics import LOG_ODDS_CHOSEN, LOG_ODDS_RATIO, NLL_LOSS, dpo_metrics


def simpo_pair_losses(
    avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float, gamma: float, label_smoothing: float
) -> torch.Tensor:
    """SimPO per pair ``[k]`` from average log-probs ``avg_c``/``avg_r`` ``[k]`` (``log pi(y) / |y|``)."""
    return smoothed_sigmoid(beta * (avg_c - avg_r) - gamma, label_smoothing)


def cpo_pair_losses(c: torch.Tensor, r: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """CPO's preference term per pair ``[k]`` from log-probs ``c``/``r`` ``[k]`` (without the NLL term)."""
    return smoothed_sigmoid(beta * (c - r), label_smoothing)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate near 0 and for very negative ``a``."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_log_odds(avg_c: torch.Tensor, avg_r: torch.Tensor) -> torch.Tensor:
    """``log odds(y_w) - log odds(y_l)`` ``[k]`` from average log-probs, ``log odds = a - log(1 - e^a)``."""
    return (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))


def orpo_pair_losses(avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term per pair ``[k]``: ``-beta * log sigma(log odds ratio)`` (without the NLL term)."""
    return -beta * F.logsigmoid(orpo_log_odds(avg_c, avg_r))


def _chosen_nll(pc: torch.Tensor, chosen_lengths: torch.Tensor, nll_sum: torch.Tensor | None) -> torch.Tensor:
    nll = nll_sum.to(pc.dtype) if nll_sum is not None else -pc
    return nll.sum() / chosen_lengths.to(pc.dtype).sum().clamp(min=1.0)


def _check_inputs(pc: torch.Tensor, pr: torch.Tensor, **optional: torch.Tensor | None) -> None:
    """``policy_chosen_logps`` ``pc`` and ``policy_rejected_logps`` ``pr`` (non-empty ``[P]`` floats) and the
    ``optional`` ``[P]`` tensors, named as the public losses' parameters (``*_lengths``: integer allowed), on one
    device."""
    p = check_pairs("policy_chosen_logps", pc, "policy_rejected_logps", pr)
    for name, t in optional.items():
        check_seq_tensor(name, t, p, integer_ok=name.endswith("_lengths"))
    check_same_device(policy_chosen_logps=pc, policy_rejected_logps=pr, **optional)


def _smoothing_and_beta(who: str, beta: object, label_smoothing: object) -> tuple[float, float]:
    beta = check_scalar("beta", beta)
    eps = check_scalar("label_smoothing", label_smoothing)
    if beta <= 0 or not 0.0 <= eps < 1.0:
        raise ValueError(f"{who} needs beta > 0 and label_smoothing in [0, 1), got {beta}, {eps}")
    return beta, eps


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, Eq. 6): ``-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.

    No reference model. ``gamma`` is the absolute target reward margin. Defaults ``beta=0.1``, ``gamma=0.5`` are
    those of :class:`fastdpo.nn.FusedLinearSimPOLoss`, Liger's ``LigerFusedLinearSimPOLoss`` and TRL's ``CPOConfig``
    (``simpo_gamma``); the SimPO paper tunes larger values (e.g. ``beta=2``, ``gamma/beta = 0.5``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` summed completion log-probs.
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (clamped at 1).
        label_smoothing: ``eps`` in ``[0, 1)`` of the conservative form.
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf, as :func:`preference_loss`.

    Returns:
        ``(loss, metrics)``; rewards are ``beta * average log-prob``, ``logps/*`` the average log-probs.
    """
    _check_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
    )
    gamma = check_scalar("gamma", gamma)
    beta, eps = _smoothing_and_beta("simpo_loss", beta, label_smoothing)
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    ac = policy_chosen_logps.to(dtype) / length(chosen_lengths, dtype)
    ar = policy_rejected_logps.to(dtype) / length(rejected_lengths, dtype)
    loss = simpo_pair_losses(ac, ar, beta, gamma, eps).mean()
    metrics = dpo_metrics(ac, ar, None, None, beta)
    return checked_output(loss, metrics, validate, "policy log-probs or lengths")


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    policy_chosen_nll_sum: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO (Xu et al. 2024, Eq. 3-5): ``mean(-log sigma(beta (log pi(y_w) - log pi(y_l)))) + alpha * NLL(y_w)``.

    The NLL term is the token mean of ``-log p`` over all chosen completion tokens of the batch
    (``sum nll / sum chosen_lengths``), as TRL's CPO trainer and Liger compute it. ``label_smoothing`` as SimPO.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` summed completion log-probs.
        chosen_lengths: ``[P]`` chosen completion token counts.
        policy_chosen_nll_sum: ``[P]`` per-sequence ``sum -log p`` if it differs from ``-policy_chosen_logps``.
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf, as :func:`preference_loss`.

    Returns:
        ``(loss, metrics)``; metrics add ``nll_loss``; rewards are ``beta * log-prob``.
    """
    _check_inputs(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        policy_chosen_nll_sum=policy_chosen_nll_sum,
    )
    alpha = check_scalar("alpha", alpha)
    beta, eps = _smoothing_and_beta("cpo_loss", beta, label_smoothing)
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    nll = _chosen_nll(pc, chosen_lengths, policy_chosen_nll_sum)
    loss = cpo_pair_losses(pc, pr, beta, eps).mean() + alpha * nll
    metrics = dpo_metrics(pc, pr, None, None, beta)
    metrics[NLL_LOSS] = nll.detach()
    return checked_output(loss, metrics, validate, "policy log-probs")


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    policy_chosen_nll_sum: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, Eq. 6-7): ``NLL(y_w) - beta * mean(log sigma(log odds(y_w) - log odds(y_l)))``.

    ``odds(y) = P(y) / (1 - P(y))`` with ``P`` the per-token average probability ``exp(log pi(y) / |y|)``;
    ``beta`` is the paper's ``lambda`` (> 0). NLL as in :func:`cpo_loss`. A sequence whose average log-prob is 0
    (no tokens, or probability 1) has infinite odds, as in the paper. ``validate`` as :func:`preference_loss`.

    Returns:
        ``(loss, metrics)``; metrics add ``nll_loss``, ``log_odds_ratio`` (mean ``log sigma(log odds)``) and
        ``log_odds_chosen`` (mean log odds); rewards are ``beta * average log-prob``.
    """
    _check_inputs(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        policy_chosen_nll_sum=policy_chosen_nll_sum,
    )
    beta = positive_beta(beta, "orpo_loss")
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ac = pc / length(chosen_lengths, dtype)
    ar = pr / length(rejected_lengths, dtype)
    log_odds = orpo_log_odds(ac, ar)
    ratio = F.logsigmoid(log_odds)
    nll = _chosen_nll(pc, chosen_lengths, policy_chosen_nll_sum)
    loss = nll - beta * ratio.mean()
    metrics = dpo_metrics(ac, ar, None, None, beta)
    metrics[NLL_LOSS] = nll.detach()
    metrics[LOG_ODDS_RATIO] = ratio.detach().mean()
    metrics[LOG_ODDS_CHOSEN] = log_odds.detach().mean()
    return checked_output(loss, metrics, validate, "policy log-probs")
