"""KTO (Ethayarajh et al. 2024, Eq. 7) on unpaired completions, as TRL's ``KTOTrainer`` computes it."""

from __future__ import annotations

import torch

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import check_float, check_same_device
from fastdpo.losses._common import check_scalar, check_seq_tensor, checked_output, positive_beta
from fastdpo.losses.metrics import KL, LOGPS_CHOSEN, LOGPS_REJECTED, REWARDS_CHOSEN, REWARDS_MARGINS, REWARDS_REJECTED


def kto_sample_losses(
    logratio: torch.Tensor,
    kl: torch.Tensor | float,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-completion KTO losses ``[N]``: desirable ``lambda_D (1 - sigma(beta (r - z0)))``, undesirable
    ``lambda_U (1 - sigma(beta (z0 - r)))``, with ``r = logratio [N]``, ``z0 = kl`` (broadcastable to ``[N]``)."""
    chosen = desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - kl)))
    rejected = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, chosen, rejected)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024, Eq. 7) on unpaired completions, as TRL's ``KTOTrainer`` computes it.

    ``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))`` (detached; the KL estimate from mismatched
    prompt/completion pairs; 0 when they are not given), ``r = policy_logps - ref_logps``;
    desirable: ``lambda_D (1 - sigma(beta (r - z0)))``, undesirable: ``lambda_U (1 - sigma(beta (z0 - r)))``;
    loss = mean over all N completions.

    Args:
        policy_logps, ref_logps: ``[N]`` summed completion log-probs.
        desirable: ``[N]`` bool label of each completion.
        policy_kl_logps, ref_kl_logps: ``[K]`` log-probs of the mismatched KL completions (both or neither).
        beta: ``> 0``.
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf, as :func:`preference_loss`.

    Returns:
        ``(loss, metrics)``: ``kl``, and (when that side is present) ``rewards/chosen``, ``logps/chosen``,
        ``rewards/rejected``, ``logps/rejected``, and ``rewards/margins`` when both are.
    """
    check_float("policy_logps", policy_logps)
    if policy_logps.dim() != 1 or policy_logps.shape[0] == 0:
        raise ValueError(f"policy_logps must be a non-empty 1-D [N] tensor, got shape {list(policy_logps.shape)}")
    n = policy_logps.shape[0]
    check_seq_tensor("ref_logps", ref_logps, n)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or desirable.shape != (n,):
        raise ValueError(f"desirable must be a bool tensor of shape [{n}]")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps must both be given or both be None")
    if policy_kl_logps is not None:
        check_float("policy_kl_logps", policy_kl_logps)
        assert ref_kl_logps is not None
        check_float("ref_kl_logps", ref_kl_logps)
        if policy_kl_logps.dim() != 1 or policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.numel() == 0:
            raise ValueError("policy_kl_logps and ref_kl_logps must be non-empty 1-D tensors of one shape")
    check_same_device(
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        desirable=desirable,
        policy_kl_logps=policy_kl_logps,
        ref_kl_logps=ref_kl_logps,
    )
    beta = positive_beta(beta, "kto_loss")
    wd = check_scalar("desirable_weight", desirable_weight)
    wu = check_scalar("undesirable_weight", undesirable_weight)
    dtype = accumulate_dtype(policy_logps.dtype)
    logratio = policy_logps.to(dtype) - ref_logps.to(dtype)
    if policy_kl_logps is not None:
        assert ref_kl_logps is not None
        kl = (policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).mean().clamp(min=0.0)
    else:
        kl = logratio.new_zeros(())
    loss = kto_sample_losses(logratio, kl, desirable, beta, wd, wu).mean()
    metrics: dict[str, torch.Tensor] = {KL: kl.detach()}
    with torch.no_grad():
        rewards = beta * logratio.detach()
        logps = policy_logps.detach().to(dtype)
        has_c, has_r = bool(desirable.any()), bool((~desirable).any())
        if has_c:
            metrics[REWARDS_CHOSEN] = rewards[desirable].mean()
            metrics[LOGPS_CHOSEN] = logps[desirable].mean()
        if has_r:
            metrics[REWARDS_REJECTED] = rewards[~desirable].mean()
            metrics[LOGPS_REJECTED] = logps[~desirable].mean()
        if has_c and has_r:
            metrics[REWARDS_MARGINS] = metrics[REWARDS_CHOSEN] - metrics[REWARDS_REJECTED]
    return checked_output(loss, metrics, validate, "policy or reference log-probs")
