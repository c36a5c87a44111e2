"""The preference-loss zoo on per-sequence log-probabilities, with TRL 1.16 semantics and TRL's metric names.

Everything here works on per-sequence quantities (``[P]`` tensors, one entry per preference pair), so it is
independent of how the log-probs were produced (naive logits, the fused LM head, a packed batch). Token-level
options of TRL's ``DPOTrainer`` are supported through per-sequence sums that the engine can compute cheaply:

* ``sft`` needs the token-mean NLL over all chosen completion tokens: pass ``chosen_lengths`` (token counts) and,
  when the sequence log-probs are not plain sums (LD-DPO), ``policy_chosen_nll_sum`` (plain per-sequence sum of
  ``-log p``).
* WPO (``use_weighting=True``) needs ``w = exp(mean_t(log p_t - log sum_v p_v^2))`` per sequence: pass either
  ready weights (``wpo_chosen_weights``/``wpo_rejected_weights``, e.g. from :func:`wpo_weights`) or the
  per-sequence sums ``policy_chosen_log_sum_p2``/``policy_rejected_log_sum_p2`` of ``log sum_v p_v^2`` over the
  completion tokens together with the lengths.
* LD-DPO: reduce per-token log-probs with :func:`ld_logps` (policy and reference alike) and pass the results as
  the sequence log-probs.

Reference-free objectives from their papers: :func:`simpo_loss`, :func:`cpo_loss`, :func:`orpo_loss`, and the
unpaired :func:`kto_loss`.

All loss arithmetic runs in float32 (float64 stays float64); the returned loss is a 0-dim tensor with a grad_fn,
the metrics are detached 0-dim float tensors. NaN/inf inputs propagate to the loss, never replaced by a finite
value; with ``validate=True`` (the default) the public losses warn (``RuntimeWarning``) when the loss or a metric is
non-finite, which costs one host sync (``validate=False`` skips it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import (
    check_float,
    check_index,
    check_same_device,
    warn_nonfinite_output,
)

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
"""The 15 loss types of TRL 1.16's ``DPOTrainer``, in TRL's order."""

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
"""Loss types that accept a non-reverse-KL ``f_divergence_type`` (TRL raises for the others)."""

BATCH_COUPLED_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})
"""Loss types whose per-pair value depends on other pairs (they sort over the batch)."""

LENGTH_LOSS_TYPES: frozenset[str] = frozenset({"ipo", "sigmoid_norm", "sft"})
"""Loss types that need completion token counts."""


# ----------------------------------------------------------------------------------------------------------------
# configuration checks
# ----------------------------------------------------------------------------------------------------------------
def _check_scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_label_smoothing(label_smoothing: object) -> float:
    """``label_smoothing`` as a float in ``[0, 1)``; ``TypeError``/``ValueError`` naming it otherwise."""
    eps = _check_scalar("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {eps}")
    return eps


def normalize_loss_config(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    use_weighting: bool = False,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate a DPO loss configuration and return ``(loss_types, loss_weights)`` as tuples.

    Raises ``ValueError`` for every combination TRL rejects or that is mathematically undefined: unknown loss or
    f-divergence type, ``loss_weights`` of the wrong length, ``exo_pair`` with ``label_smoothing == 0``, ``robust``
    with ``label_smoothing`` outside ``[0, 1/2)``, a non-reverse-KL f-divergence with a loss type outside
    :data:`F_DIVERGENCE_LOSS_TYPES`, WPO weighting with ``aot``/``aot_unpaired``, ``beta <= 0``, ``discopop_tau <= 0``.
    """
    if isinstance(loss_type, str):
        types: tuple[str, ...] = (loss_type,)
    elif isinstance(loss_type, (list, tuple)):
        types = tuple(loss_type)
    else:
        raise TypeError(
            f"loss_type must be a loss type name or a list of names (one of {list(LOSS_TYPES)}), got {loss_type!r}"
        )
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if not isinstance(t, str) or t not in LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {t!r}: valid loss types are {list(LOSS_TYPES)}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(_check_scalar("loss_weights[i]", w) for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({list(types)}); "
                "give one weight per loss type"
            )
    beta = _check_scalar("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = check_label_smoothing(label_smoothing)
    if "exo_pair" in types and eps == 0.0:
        raise ValueError(
            "loss_type 'exo_pair' needs label_smoothing > 0 (its target distribution is [1-eps, eps]); "
            "the EXO paper recommends 1e-3"
        )
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {eps}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}: valid are {list(F_DIVERGENCE_TYPES)}")
    if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only defined for loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {list(types)}"
        )
    _check_scalar("f_alpha_divergence_coef", f_alpha_divergence_coef)
    tau = _check_scalar("discopop_tau", discopop_tau)
    if tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    if use_weighting and set(types) & BATCH_COUPLED_LOSS_TYPES:
        raise ValueError(
            "use_weighting (WPO) is not defined for 'aot'/'aot_unpaired': they sort pairs across the batch, which "
            "misaligns per-pair weights"
        )
    return types, weights


def _check_seq_tensor(name: str, t: torch.Tensor | None, n: int, *, integer_ok: bool = False) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer_ok and not t.dtype.is_floating_point:
        check_index(name, t)
    else:
        check_float(name, t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one entry per pair), got {list(t.shape)}")


def _length(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Completion token counts as ``dtype``, clamped at 1 (TRL's ``.clamp(min=1)``)."""
    return t.to(dtype).clamp(min=1.0)


def _loss_and_metrics(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss and every metric in one detached vector (one finiteness check, one sync)."""
    parts = [loss, *metrics.values()]
    return torch.stack([t.detach().reshape(()).double() for t in parts])


def _positive_beta(beta: object, who: str) -> float:
    value = _check_scalar("beta", beta)
    if value <= 0:
        raise ValueError(f"{who} needs beta > 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# per-pair building blocks
# ----------------------------------------------------------------------------------------------------------------
def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str, f_alpha_divergence_coef: float, input_dtype: torch.dtype
) -> torch.Tensor:
    """Per-sequence scores ``s = f'(pi/ref)`` of TRL's f-DPO for ``logratios = log pi - log ref``.

    ``input_dtype`` is the dtype the log-probs arrived in: the alpha-divergence exponent is clamped at 11 for float16
    inputs (so ``exp`` stays representable there) and at 80 otherwise, as in TRL.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return logratios
        clamp_max = 11.0 if input_dtype == torch.float16 else 80.0
        t = torch.clamp((a - 1.0) * logratios, max=clamp_max)
        return (torch.exp(t) - 1.0) / (a - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}: valid are {list(F_DIVERGENCE_TYPES)}")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_pair_loss(
    loss_type: str,
    *,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    sc: torch.Tensor,
    sr: torch.Tensor,
    len_c: torch.Tensor | None,
    len_r: torch.Tensor | None,
    beta: float,
    eps: float,
    tau: float,
) -> torch.Tensor:
    """Per-pair loss ``[p]`` of one loss type (everything except ``sft``)."""
    z = beta * (sc - sr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type in ("ipo", "sigmoid_norm"):
        assert len_c is not None and len_r is not None
        delta = sc / _length(len_c, sc.dtype) - sr / _length(len_r, sr.dtype)
        if loss_type == "ipo":
            return (delta - 1.0 / (2.0 * beta)) ** 2
        return -F.logsigmoid(beta * delta)
    if loss_type == "exo_pair":
        log_pw = math.log1p(-eps)
        log_pl = math.log(eps)
        return torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "aot_unpaired":
        delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1.0 - torch.sigmoid(beta * (c - r))
    if loss_type == "discopop":
        m = torch.sigmoid(z / tau)
        return -F.logsigmoid(z) * (1.0 - m) + torch.exp(-z) * m
    raise ValueError(f"Unknown loss_type {loss_type!r}: valid loss types are {list(LOSS_TYPES)}")


def dpo_loss_sum(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor | None,
    rr: torch.Tensor | None,
    *,
    loss_types: tuple[str, ...],
    loss_weights: tuple[float, ...],
    beta: float,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    input_dtype: torch.dtype,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    chosen_nll_sum: torch.Tensor | None,
    pair_weights: torch.Tensor | None,
    num_pairs: int | torch.Tensor,
    num_chosen_tokens: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_k w_k * (sum over the given pairs of loss_k) / num_pairs`` (the ``sft`` term: ``sum nll / tokens``).

    Low-level and unchecked (use :func:`preference_loss`): the inputs are already in the compute dtype. With
    ``num_pairs`` / ``num_chosen_tokens`` the batch totals, calling this on disjoint subsets of pairs and adding the
    results gives the full-batch loss for every pair-local loss type (not ``aot``/``aot_unpaired``, which sort the
    batch, and not ``sft`` combined with ``pair_weights``, a product of two batch means) — the grad-in-forward path
    of :mod:`fastdpo.nn` relies on this.
    """
    zero = pc.new_zeros(())
    c = pc - rc if rc is not None else pc
    r = pr - rr if rr is not None else pr
    rc_ = rc if rc is not None else zero
    rr_ = rr if rr is not None else zero
    sc = f_divergence_scores(c, f_divergence_type, f_alpha_divergence_coef, input_dtype)
    sr = f_divergence_scores(r, f_divergence_type, f_alpha_divergence_coef, input_dtype)
    total = zero
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sft":
            assert chosen_nll_sum is not None and num_chosen_tokens is not None
            term = chosen_nll_sum.sum() / num_chosen_tokens
            if pair_weights is not None:
                term = term * pair_weights.sum() / num_pairs
        else:
            per_pair = _per_pair_loss(
                loss_type, pc=pc, pr=pr, rc=rc_, rr=rr_, c=c, r=r, sc=sc, sr=sr,
                len_c=chosen_lengths, len_r=rejected_lengths, beta=beta, eps=label_smoothing, tau=discopop_tau,
            )
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            term = per_pair.sum() / num_pairs
        total = total + weight * term
    return total


def dpo_metrics(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None, beta: float
) -> dict[str, torch.Tensor]:
    """TRL's reward/log-prob metrics (detached 0-dim tensors) from per-pair log-probs ``[P]``.

    ``rewards/chosen`` = mean ``beta*(pi_c - ref_c)``, ``rewards/rejected`` likewise, ``rewards/accuracies`` = mean of
    ``1[reward_c > reward_r]``, ``rewards/margins`` = mean ``reward_c - reward_r``, ``logps/chosen``/``logps/rejected``
    = mean policy log-probs.
    """
    with torch.no_grad():
        pc = pc.detach()
        pr = pr.detach()
        c = pc - rc.detach() if rc is not None else pc
        r = pr - rr.detach() if rr is not None else pr
        chosen_rewards = beta * c
        rejected_rewards = beta * r
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(c.dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }


# ----------------------------------------------------------------------------------------------------------------
# token-level helpers for the engine (WPO, LD-DPO)
# ----------------------------------------------------------------------------------------------------------------
def _check_token_inputs(seq_ids: torch.Tensor, **tensors: torch.Tensor) -> int:
    check_index("seq_ids", seq_ids)
    if seq_ids.dim() != 1:
        raise ValueError(f"seq_ids must be 1-D [M], got shape {list(seq_ids.shape)}")
    m = seq_ids.shape[0]
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (m,):
            raise ValueError(f"{name} must have shape [{m}] like seq_ids, got {list(t.shape)}")
    check_same_device(seq_ids=seq_ids, **tensors)
    return m


def wpo_weights(
    token_logps: torch.Tensor,
    token_log_sum_p2: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """WPO sequence weights (Eq. 2 of the WPO paper, as TRL 1.16 computes them), without gradient.

    ``w_s = exp( sum_{t in s} (log p_t - log sum_v p_v^2)_t / max(|s|, 1) )``.

    Args:
        token_logps: ``[M]`` float, the policy log-prob of each completion token (plain, not LD-weighted).
        token_log_sum_p2: ``[M]`` float, ``log sum_v p_v^2`` of the policy distribution at each of those tokens
            (``TokenStats.log_sum_p2`` of the fused head).
        seq_ids: ``[M]`` integer sequence id of each token in ``[0, num_seqs)`` (chosen of pair i = i, rejected = P+i).
        num_seqs: ``S`` (``2P``).
        validate: check that every ``seq_ids`` entry lies in ``[0, S)`` (one sync); with ``False`` a token whose id
            lies outside counts toward no sequence.

    Returns:
        ``[S]`` float32 (float64 for float64 inputs) weights, detached; a sequence with no tokens gets weight 1.
        Pass ``w[:P]``, ``w[P:]`` as ``wpo_chosen_weights``/``wpo_rejected_weights`` of :func:`preference_loss`.
    """
    from fastdpo.segments import segment_counts, segment_sum

    check_float("token_logps", token_logps)
    check_float("token_log_sum_p2", token_log_sum_p2)
    _check_token_inputs(seq_ids, token_logps=token_logps, token_log_sum_p2=token_log_sum_p2)
    with torch.no_grad():
        dtype = accumulate_dtype(token_logps.dtype)
        aligned = token_logps.detach().to(dtype) - token_log_sum_p2.detach().to(dtype)
        sums = segment_sum(aligned, seq_ids, num_seqs, validate=validate).to(dtype)
        counts = segment_counts(seq_ids, num_seqs)
        return torch.exp(sums / _length(counts, dtype))


def ld_token_weights(
    token_pos: torch.Tensor,
    seq_ids: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ld_alpha: float,
    *,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """LD-DPO token weights (TRL 1.16 ``ld_alpha``): ``1`` for the first ``min(|y_c|, |y_r|)`` completion tokens of
    each pair, ``ld_alpha`` for the rest; ``[M]`` ``dtype``. ``sum_t w_t log p_t`` per sequence is :func:`ld_logps`.

    Args:
        token_pos: ``[M]`` integer 0-based index of each token within its completion (collator's ``logp_pos``).
        seq_ids: ``[M]`` integer sequence id, chosen of pair i = i, rejected of pair i = P + i.
        chosen_lengths, rejected_lengths: ``[P]`` integer completion token counts.
        ld_alpha: weight of the tokens past the shared length (TRL: in [0, 1]).
        validate: check that every ``seq_ids`` entry lies in ``[0, 2P)`` (one sync); with ``False`` a token whose
            id lies outside gets weight 1 (and counts toward no sequence in :func:`ld_logps`).
    """
    check_index("token_pos", token_pos)
    _check_token_inputs(seq_ids, token_pos=token_pos)
    check_index("chosen_lengths", chosen_lengths)
    check_index("rejected_lengths", rejected_lengths)
    if chosen_lengths.dim() != 1 or chosen_lengths.shape != rejected_lengths.shape:
        raise ValueError(
            f"chosen_lengths and rejected_lengths must both be [P], got {list(chosen_lengths.shape)} and "
            f"{list(rejected_lengths.shape)}"
        )
    check_same_device(token_pos=token_pos, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    alpha = _check_scalar("ld_alpha", ld_alpha)
    p = chosen_lengths.shape[0]
    seq = seq_ids.to(torch.int64)
    inside = (seq >= 0) & (seq < 2 * p)
    if validate and seq.numel() and not bool(inside.all()):
        raise ValueError(f"seq_ids must lie in [0, {2 * p}) (2 * number of pairs)")
    shared = torch.minimum(chosen_lengths, rejected_lengths).to(torch.int64)
    if p == 0:  # no pair at all: every token lies outside (validate=False); the gather below needs one row
        shared = shared.new_zeros(1)
    pair = torch.where(inside, torch.where(seq >= p, seq - p, seq), 0)
    in_shared = (token_pos.to(torch.int64) < shared.index_select(0, pair)) | ~inside
    return torch.where(in_shared, torch.ones((), dtype=dtype, device=token_pos.device),
                       torch.full((), alpha, dtype=dtype, device=token_pos.device))


def ld_logps(
    token_logps: torch.Tensor,
    token_pos: torch.Tensor,
    seq_ids: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ld_alpha: float,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """LD-DPO sequence log-probs (TRL 1.16 ``ld_alpha``): the first ``min(|y_c|, |y_r|)`` completion tokens of each
    pair count fully, the rest are scaled by ``ld_alpha`` (:func:`ld_token_weights`). Use the same call for policy and
    reference.

    Args:
        token_logps: ``[M]`` float log-prob of each completion token (differentiable).
        token_pos, seq_ids, chosen_lengths, rejected_lengths, ld_alpha, validate: as :func:`ld_token_weights`.

    Returns:
        ``[2P]`` float32 (float64 for float64 input) ``[chosen..., rejected...]``, differentiable wrt token_logps.
    """
    from fastdpo.segments import segment_sum

    check_float("token_logps", token_logps)
    _check_token_inputs(seq_ids, token_logps=token_logps, token_pos=token_pos)
    check_same_device(token_logps=token_logps, chosen_lengths=chosen_lengths)
    dtype = accumulate_dtype(token_logps.dtype)
    scale = ld_token_weights(token_pos, seq_ids, chosen_lengths, rejected_lengths, ld_alpha, dtype=dtype,
                             validate=validate)
    p = chosen_lengths.shape[0]
    return segment_sum(token_logps.to(dtype) * scale, seq_ids, 2 * p, validate=validate).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# public DPO loss
# ----------------------------------------------------------------------------------------------------------------
def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    policy_chosen_nll_sum: torch.Tensor | None = None,
    policy_rejected_nll_sum: torch.Tensor | None = None,
    use_weighting: bool = False,
    wpo_chosen_weights: torch.Tensor | None = None,
    wpo_rejected_weights: torch.Tensor | None = None,
    policy_chosen_log_sum_p2: torch.Tensor | None = None,
    policy_rejected_log_sum_p2: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family preference loss with TRL 1.16 ``DPOTrainer`` semantics, and TRL's reward metrics.

    ``loss = sum_k loss_weights[k] * mean_pairs(loss_k)`` over ``loss_type`` (a name or a list, see
    :data:`LOSS_TYPES`); the formulas are in ``LOSSES.md``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` float, summed completion log-probs of the policy
            (LD-weighted for LD-DPO, see :func:`ld_logps`).
        ref_chosen_logps, ref_rejected_logps: ``[P]`` float reference log-probs, or ``None`` for a reference-free
            objective (reference log-probs taken as 0, like Liger's ``use_ref_model=False``).
        loss_type, loss_weights: one loss type or a list with one weight each (default all 1).
        beta: inverse temperature ``beta > 0``.
        label_smoothing: ``eps`` of ``exo_pair`` (> 0), ``robust`` ([0, 1/2)), ``aot``/``aot_unpaired``.
        f_divergence_type, f_alpha_divergence_coef: f-DPO scores (only for :data:`F_DIVERGENCE_LOSS_TYPES`).
        discopop_tau: temperature of DiscoPOP's mixing sigmoid.
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (int or float; clamped at 1), required by
            ``ipo``, ``sigmoid_norm``, ``sft`` (chosen only) and by WPO from log-sum-p2 sums.
        policy_chosen_nll_sum, policy_rejected_nll_sum: ``[P]`` plain (un-LD-weighted) per-sequence sums of
            ``-log p``; default ``-policy_*_logps``. ``sft`` uses the chosen one: ``sum(nll) / sum(chosen_lengths)``
            over the batch (0 if the batch has no chosen tokens, where TRL gives NaN).
        use_weighting: WPO — multiply each pair's loss by ``w_c * w_r`` (no gradient through the weights).
        wpo_chosen_weights, wpo_rejected_weights: ``[P]`` ready WPO weights (e.g. from :func:`wpo_weights`), or
        policy_chosen_log_sum_p2, policy_rejected_log_sum_p2: ``[P]`` per-sequence sums over completion tokens of
            ``log sum_v p_v^2``; then ``w = exp((sum log p - sum log sum p^2) / max(len, 1))`` with the lengths and the
            plain log-prob sums (``-nll_sum``).
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf (one host sync); NaN inputs
            always propagate to the loss, never replaced. ``False`` skips the check.

    Returns:
        ``(loss, metrics)``: 0-dim float32 loss (float64 for float64 inputs) with a grad_fn; metrics dict with
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected`` (detached 0-dim tensors).

    Raises:
        ValueError: invalid configuration (see :func:`normalize_loss_config`), missing lengths/WPO inputs, empty batch,
            mismatched shapes or devices. TypeError: non-float log-probs, non-integer/float lengths.
    """
    types, weights = normalize_loss_config(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, use_weighting=use_weighting,
    )
    check_float("policy_chosen_logps", policy_chosen_logps)
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [P], got shape {list(policy_chosen_logps.shape)}")
    p = policy_chosen_logps.shape[0]
    if p == 0:
        raise ValueError("preference_loss needs at least one pair (policy_chosen_logps is empty)")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must both be tensors or both be None")
    floats = {
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "policy_chosen_nll_sum": policy_chosen_nll_sum,
        "policy_rejected_nll_sum": policy_rejected_nll_sum,
        "wpo_chosen_weights": wpo_chosen_weights,
        "wpo_rejected_weights": wpo_rejected_weights,
        "policy_chosen_log_sum_p2": policy_chosen_log_sum_p2,
        "policy_rejected_log_sum_p2": policy_rejected_log_sum_p2,
    }
    if policy_rejected_logps is None:
        raise TypeError("policy_rejected_logps must be a torch.Tensor, got None")
    for name, t in floats.items():
        _check_seq_tensor(name, t, p)
    _check_seq_tensor("chosen_lengths", chosen_lengths, p, integer_ok=True)
    _check_seq_tensor("rejected_lengths", rejected_lengths, p, integer_ok=True)
    check_same_device(
        policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        **floats,
    )
    for t in ("ipo", "sigmoid_norm"):
        if t in types and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(
                f"loss_type {t!r} normalizes by completion length: pass chosen_lengths and rejected_lengths"
            )
    if "sft" in types and chosen_lengths is None:
        raise ValueError("loss_type 'sft' averages over chosen completion tokens: pass chosen_lengths")

    input_dtype = policy_chosen_logps.dtype
    dtype = accumulate_dtype(input_dtype)
    pc = policy_chosen_logps.to(dtype)
    pr = policy_rejected_logps.to(dtype)
    rc = ref_chosen_logps.to(dtype) if ref_chosen_logps is not None else None
    rr = ref_rejected_logps.to(dtype) if ref_rejected_logps is not None else None
    nll_c = policy_chosen_nll_sum.to(dtype) if policy_chosen_nll_sum is not None else -pc
    nll_r = policy_rejected_nll_sum.to(dtype) if policy_rejected_nll_sum is not None else -pr

    pair_weights = None
    if use_weighting:
        if wpo_chosen_weights is not None or wpo_rejected_weights is not None:
            if wpo_chosen_weights is None or wpo_rejected_weights is None:
                raise ValueError("pass both wpo_chosen_weights and wpo_rejected_weights")
            w_c, w_r = wpo_chosen_weights.detach().to(dtype), wpo_rejected_weights.detach().to(dtype)
        else:
            if policy_chosen_log_sum_p2 is None or policy_rejected_log_sum_p2 is None:
                raise ValueError(
                    "use_weighting=True needs wpo_chosen_weights/wpo_rejected_weights or "
                    "policy_chosen_log_sum_p2/policy_rejected_log_sum_p2"
                )
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("use_weighting=True from log-sum-p2 sums needs chosen_lengths and rejected_lengths")
            with torch.no_grad():
                w_c = torch.exp((-nll_c - policy_chosen_log_sum_p2.to(dtype)) / _length(chosen_lengths, dtype))
                w_r = torch.exp((-nll_r - policy_rejected_log_sum_p2.to(dtype)) / _length(rejected_lengths, dtype))
        pair_weights = (w_c * w_r).detach()

    num_chosen_tokens = None
    if "sft" in types:
        assert chosen_lengths is not None
        num_chosen_tokens = chosen_lengths.to(dtype).sum().clamp(min=1.0)

    loss = dpo_loss_sum(
        pc, pr, rc, rr, loss_types=types, loss_weights=weights, beta=float(beta),
        label_smoothing=float(label_smoothing), f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=float(f_alpha_divergence_coef), discopop_tau=float(discopop_tau),
        input_dtype=input_dtype, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_nll_sum=nll_c, pair_weights=pair_weights, num_pairs=p, num_chosen_tokens=num_chosen_tokens,
    )
    metrics = dpo_metrics(pc, pr, rc, rr, float(beta))
    if validate:
        warn_nonfinite_output(_loss_and_metrics(loss, metrics), "policy or reference log-probs", "loss or metrics")
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# reference-free family
# ----------------------------------------------------------------------------------------------------------------
def _check_pairs(name_c: str, c: torch.Tensor, name_r: str, r: torch.Tensor | None) -> int:
    check_float(name_c, c)
    if c.dim() != 1 or c.shape[0] == 0:
        raise ValueError(f"{name_c} must be a non-empty 1-D [P] tensor, got shape {list(c.shape)}")
    p = c.shape[0]
    if r is not None:
        _check_seq_tensor(name_r, r, p)
    return p


def _chosen_nll(pc: torch.Tensor, chosen_lengths: torch.Tensor, nll_sum: torch.Tensor | None) -> torch.Tensor:
    nll = nll_sum.to(pc.dtype) if nll_sum is not None else -pc
    return nll.sum() / chosen_lengths.to(pc.dtype).sum().clamp(min=1.0)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, Eq. 6): ``-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.

    No reference model. ``gamma`` is the absolute target reward margin (the paper tunes ``gamma/beta``; defaults
    ``beta=2``, ``gamma=1`` are its recommended ``gamma/beta = 0.5``). ``label_smoothing`` ``eps`` gives the
    conservative form ``-(1-eps) log sigma(z) - eps log sigma(-z)`` (as TRL's CPO trainer and Liger).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` summed completion log-probs.
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (clamped at 1).
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf, as :func:`preference_loss`.

    Returns:
        ``(loss, metrics)``; rewards are ``beta * average log-prob``, ``logps/*`` the average log-probs.
    """
    p = _check_pairs("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    _check_seq_tensor("chosen_lengths", chosen_lengths, p, integer_ok=True)
    _check_seq_tensor("rejected_lengths", rejected_lengths, p, integer_ok=True)
    check_same_device(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    beta = _check_scalar("beta", beta)
    gamma = _check_scalar("gamma", gamma)
    eps = _check_scalar("label_smoothing", label_smoothing)
    if beta <= 0 or not 0.0 <= eps < 1.0:
        raise ValueError(f"simpo_loss needs beta > 0 and label_smoothing in [0, 1), got {beta}, {eps}")
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    ac = policy_chosen_logps.to(dtype) / _length(chosen_lengths, dtype)
    ar = policy_rejected_logps.to(dtype) / _length(rejected_lengths, dtype)
    loss = _smoothed_sigmoid(beta * (ac - ar) - gamma, eps).mean()
    metrics = dpo_metrics(ac, ar, None, None, beta)
    if validate:
        warn_nonfinite_output(_loss_and_metrics(loss, metrics), "policy log-probs or lengths", "loss or metrics")
    return loss, metrics


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
    p = _check_pairs("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    _check_seq_tensor("chosen_lengths", chosen_lengths, p, integer_ok=True)
    _check_seq_tensor("policy_chosen_nll_sum", policy_chosen_nll_sum, p)
    check_same_device(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, policy_chosen_nll_sum=policy_chosen_nll_sum)
    beta = _check_scalar("beta", beta)
    alpha = _check_scalar("alpha", alpha)
    eps = _check_scalar("label_smoothing", label_smoothing)
    if beta <= 0 or not 0.0 <= eps < 1.0:
        raise ValueError(f"cpo_loss needs beta > 0 and label_smoothing in [0, 1), got {beta}, {eps}")
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    nll = _chosen_nll(pc, chosen_lengths, policy_chosen_nll_sum)
    loss = _smoothed_sigmoid(beta * (pc - pr), eps).mean() + alpha * nll
    metrics = dpo_metrics(pc, pr, None, None, beta)
    metrics["nll_loss"] = nll.detach()
    if validate:
        warn_nonfinite_output(_loss_and_metrics(loss, metrics), "policy log-probs", "loss or metrics")
    return loss, metrics


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate near 0 and for very negative ``a``."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


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
    p = _check_pairs("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    _check_seq_tensor("chosen_lengths", chosen_lengths, p, integer_ok=True)
    _check_seq_tensor("rejected_lengths", rejected_lengths, p, integer_ok=True)
    _check_seq_tensor("policy_chosen_nll_sum", policy_chosen_nll_sum, p)
    check_same_device(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                      policy_chosen_nll_sum=policy_chosen_nll_sum)
    beta = _positive_beta(beta, "orpo_loss")
    dtype = accumulate_dtype(policy_chosen_logps.dtype)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ac = pc / _length(chosen_lengths, dtype)
    ar = pr / _length(rejected_lengths, dtype)
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    ratio = F.logsigmoid(log_odds)
    nll = _chosen_nll(pc, chosen_lengths, policy_chosen_nll_sum)
    loss = nll - beta * ratio.mean()
    metrics = dpo_metrics(ac, ar, None, None, beta)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    if validate:
        warn_nonfinite_output(_loss_and_metrics(loss, metrics), "policy log-probs", "loss or metrics")
    return loss, metrics


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
    _check_seq_tensor("ref_logps", ref_logps, n)
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
    check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable,
                      policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    beta = _positive_beta(beta, "kto_loss")
    wd = _check_scalar("desirable_weight", desirable_weight)
    wu = _check_scalar("undesirable_weight", undesirable_weight)
    dtype = accumulate_dtype(policy_logps.dtype)
    logratio = policy_logps.to(dtype) - ref_logps.to(dtype)
    if policy_kl_logps is not None:
        assert ref_kl_logps is not None
        kl = (policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).mean().clamp(min=0.0)
    else:
        kl = logratio.new_zeros(())
    chosen_losses = wd * (1.0 - torch.sigmoid(beta * (logratio - kl)))
    rejected_losses = wu * (1.0 - torch.sigmoid(beta * (kl - logratio)))
    loss = torch.where(desirable, chosen_losses, rejected_losses).mean()
    metrics: dict[str, torch.Tensor] = {"kl": kl.detach()}
    with torch.no_grad():
        rewards = beta * logratio.detach()
        logps = policy_logps.detach().to(dtype)
        has_c, has_r = bool(desirable.any()), bool((~desirable).any())
        if has_c:
            metrics["rewards/chosen"] = rewards[desirable].mean()
            metrics["logps/chosen"] = logps[desirable].mean()
        if has_r:
            metrics["rewards/rejected"] = rewards[~desirable].mean()
            metrics["logps/rejected"] = logps[~desirable].mean()
        if has_c and has_r:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if validate:
        warn_nonfinite_output(_loss_and_metrics(loss, metrics), "policy or reference log-probs", "loss or metrics")
    return loss, metrics
