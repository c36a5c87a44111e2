"""The paired DPO loss zoo on per-sequence log-probabilities, with TRL 1.16 ``DPOTrainer`` semantics.

Everything here works on per-sequence quantities (``[P]`` tensors, one entry per preference pair), so it is
independent of how the log-probs were produced (naive logits, the fused LM head, a packed batch). The formulas are
in ``LOSSES.md``: with ``c = pi_c - ref_c``, ``r = pi_r - ref_r`` and f-divergence scores ``s = f'(pi/ref)``, the
loss is ``sum_k w_k * mean_pairs(loss_k)`` over the configured loss types. Token-level options of TRL's
``DPOTrainer`` enter through per-sequence sums that the engine computes cheaply:

* ``sft`` needs the token-mean NLL over all chosen completion tokens: pass ``chosen_lengths`` (token counts) and,
  when the sequence log-probs are not plain sums (LD-DPO), ``policy_chosen_nll_sum`` (plain per-sequence sum of
  ``-log p``).
* WPO (``use_weighting=True``) needs ``w = exp(mean_t(log p_t - log sum_v p_v^2))`` per sequence: pass either
  ready weights (``wpo_chosen_weights``/``wpo_rejected_weights``, e.g. from :func:`~fastdpo.losses.wpo_weights`) or
  the per-sequence sums ``policy_chosen_log_sum_p2``/``policy_rejected_log_sum_p2`` of ``log sum_v p_v^2`` over the
  completion tokens together with the lengths.
* LD-DPO: reduce per-token log-probs with :func:`~fastdpo.losses.ld_logps` (policy and reference alike) and pass
  the results as the sequence log-probs.

All loss arithmetic runs in float32 (float64 stays float64); the returned loss is a 0-dim tensor with a grad_fn,
the metrics are detached 0-dim float tensors. NaN/inf inputs propagate to the loss, never replaced by a finite
value; with ``validate=True`` (the default) the public losses warn (``RuntimeWarning``) when the loss or a metric is
non-finite, which costs one host sync (``validate=False`` skips it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch
import torch.nn.functional as F

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import check_float, check_keywords, check_same_device, warn_nonfinite_output
from fastdpo.losses._common import check_seq_tensor, checked_output, length, smoothed_sigmoid
from fastdpo.losses.config import F_DIVERGENCE_TYPES, LOSS_TYPES, PreferenceLossConfig
from fastdpo.losses.metrics import dpo_metrics

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.losses.config import LossOptions


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


class _Scores(NamedTuple):
    """What the per-pair losses read (``[k]``, compute dtype): log-probs ``pc``, ``pr``, reference ``rc``, ``rr`` (0
    without a reference), the log-ratios ``c``, ``r``, their f-divergence scores ``sc``, ``sr`` and the completion
    lengths ``len_c``, ``len_r`` (or None)."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    c: torch.Tensor
    r: torch.Tensor
    sc: torch.Tensor
    sr: torch.Tensor
    len_c: torch.Tensor | None
    len_r: torch.Tensor | None


def _per_pair_loss(loss_type: str, scores: _Scores, config: PreferenceLossConfig) -> torch.Tensor:
    """Per-pair loss ``[k]`` of one loss type (everything except ``sft``)."""
    pc, pr, rc, rr, c, r, sc, sr, len_c, len_r = scores
    beta, eps, tau = config.beta, config.label_smoothing, config.discopop_tau
    z = beta * (sc - sr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type in ("ipo", "sigmoid_norm"):
        assert len_c is not None and len_r is not None
        delta = sc / length(len_c, sc.dtype) - sr / length(len_r, sr.dtype)
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
        return smoothed_sigmoid(beta * delta, eps)
    if loss_type == "aot_unpaired":
        delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
        return smoothed_sigmoid(beta * delta, eps)
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
    config: PreferenceLossConfig,
    *,
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
    results gives the full-batch loss whenever ``config.pair_local``
    (:func:`~fastdpo.losses.config.is_pair_local`) -- the grad-in-forward paths rely on this.
    """
    zero = pc.new_zeros(())
    c = pc - rc if rc is not None else pc
    r = pr - rr if rr is not None else pr
    rc_ = rc if rc is not None else zero
    rr_ = rr if rr is not None else zero
    f_div, f_alpha = config.f_divergence_type, config.f_alpha_divergence_coef
    sc = f_divergence_scores(c, f_div, f_alpha, input_dtype)
    sr = f_divergence_scores(r, f_div, f_alpha, input_dtype)
    scores = _Scores(pc, pr, rc_, rr_, c, r, sc, sr, chosen_lengths, rejected_lengths)
    total = zero
    for loss_type, weight in zip(config.loss_type, config.loss_weights, strict=True):
        if loss_type == "sft":
            assert chosen_nll_sum is not None and num_chosen_tokens is not None
            term = chosen_nll_sum.sum() / num_chosen_tokens
            if pair_weights is not None:
                term = term * pair_weights.sum() / num_pairs
        else:
            per_pair = _per_pair_loss(loss_type, scores, config)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            term = per_pair.sum() / num_pairs
        total = total + weight * term
    return total


class PairStatistics(TypedDict, total=False):
    """The per-batch ``[P]`` tensors beside the log-probs that :func:`preference_loss` takes (documented there), as
    keywords of :func:`partial_preference_loss` and :meth:`fastdpo.nn.DPOLoss.forward`."""

    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    policy_chosen_nll_sum: torch.Tensor | None
    policy_rejected_nll_sum: torch.Tensor | None
    wpo_chosen_weights: torch.Tensor | None
    wpo_rejected_weights: torch.Tensor | None
    policy_chosen_log_sum_p2: torch.Tensor | None
    policy_rejected_log_sum_p2: torch.Tensor | None


def check_statistics_names(statistics: Mapping[str, object], where: str) -> None:
    """``TypeError`` naming ``where`` for a keyword that is not one of :class:`PairStatistics`."""
    check_keywords(where, statistics, PairStatistics.__annotations__, "the per-batch inputs")


class _Prepared(NamedTuple):
    """Checked inputs of a loss in the compute dtype, named as :func:`dpo_loss_sum`'s parameters: log-probs ``pc``,
    ``pr`` and reference ``rc``, ``rr`` (or None), the ``input_dtype``, the lengths as given, the chosen NLL sums
    ``chosen_nll_sum`` and WPO ``pair_weights`` (or None)."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    input_dtype: torch.dtype
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    chosen_nll_sum: torch.Tensor
    pair_weights: torch.Tensor | None

    def loss_sum(
        self, config: PreferenceLossConfig, num_pairs: int | torch.Tensor, num_chosen_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """:func:`dpo_loss_sum` of these pairs with the batch totals."""
        return dpo_loss_sum(config=config, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens, **self._asdict())


def sequence_config(config: PreferenceLossConfig) -> PreferenceLossConfig:
    """``config``, refused (``ValueError``) when it holds ``ld_alpha``: a loss over sequence log-probs has no tokens to
    weight."""
    if config.ld_alpha is not None:
        raise ValueError(
            "ld_alpha (LD-DPO) weights per-token log-probs: reduce them with fastdpo.losses.ld_logps (policy and "
            "reference) and pass a loss_config without ld_alpha"
        )
    return config


def _prepared(
    config: PreferenceLossConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    statistics: PairStatistics,
) -> _Prepared:
    """Checked inputs of :func:`preference_loss` in the compute dtype."""
    types = config.loss_type
    check_float("policy_chosen_logps", policy_chosen_logps)
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [P], got shape {list(policy_chosen_logps.shape)}")
    p = policy_chosen_logps.shape[0]
    if p == 0:
        raise ValueError("preference_loss needs at least one pair (policy_chosen_logps is empty)")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must both be tensors or both be None")
    if policy_rejected_logps is None:
        raise TypeError("policy_rejected_logps must be a torch.Tensor, got None")
    stats: dict[str, torch.Tensor | None] = {name: statistics.get(name) for name in PairStatistics.__annotations__}
    chosen_lengths, rejected_lengths = stats.pop("chosen_lengths"), stats.pop("rejected_lengths")
    floats = {
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        **stats,
    }
    for name, t in floats.items():
        check_seq_tensor(name, t, p)
    check_seq_tensor("chosen_lengths", chosen_lengths, p, integer_ok=True)
    check_seq_tensor("rejected_lengths", rejected_lengths, p, integer_ok=True)
    check_same_device(
        policy_chosen_logps=policy_chosen_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
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

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(dtype) if t is not None else None

    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    nll_c = cast(stats["policy_chosen_nll_sum"])
    nll_c = nll_c if nll_c is not None else -pc
    pair_weights = None
    if config.use_weighting:
        pair_weights = _wpo_pair_weights(stats, chosen_lengths, rejected_lengths, pc, pr, nll_c)
    return _Prepared(
        pc,
        pr,
        cast(ref_chosen_logps),
        cast(ref_rejected_logps),
        input_dtype,
        chosen_lengths,
        rejected_lengths,
        nll_c,
        pair_weights,
    )


def _wpo_pair_weights(
    stats: Mapping[str, torch.Tensor | None],
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    pc: torch.Tensor,
    pr: torch.Tensor,
    nll_c: torch.Tensor,
) -> torch.Tensor:
    """WPO's ``w_c * w_r`` ``[P]`` (no gradient), from ready weights or from the log-sum-p2 sums."""
    dtype = pc.dtype
    w_c, w_r = stats["wpo_chosen_weights"], stats["wpo_rejected_weights"]
    if w_c is not None or w_r is not None:
        if w_c is None or w_r is None:
            raise ValueError("pass both wpo_chosen_weights and wpo_rejected_weights")
        return (w_c.detach().to(dtype) * w_r.detach().to(dtype)).detach()
    lsp2_c, lsp2_r = stats["policy_chosen_log_sum_p2"], stats["policy_rejected_log_sum_p2"]
    if lsp2_c is None or lsp2_r is None:
        raise ValueError(
            "use_weighting=True needs wpo_chosen_weights/wpo_rejected_weights or "
            "policy_chosen_log_sum_p2/policy_rejected_log_sum_p2"
        )
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("use_weighting=True from log-sum-p2 sums needs chosen_lengths and rejected_lengths")
    nll_r = stats["policy_rejected_nll_sum"]
    nll_r = nll_r.to(dtype) if nll_r is not None else -pr
    with torch.no_grad():
        w_c = torch.exp((-nll_c - lsp2_c.to(dtype)) / length(chosen_lengths, dtype))
        w_r = torch.exp((-nll_r - lsp2_r.to(dtype)) / length(rejected_lengths, dtype))
    return (w_c * w_r).detach()


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_config: PreferenceLossConfig | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    policy_chosen_nll_sum: torch.Tensor | None = None,
    policy_rejected_nll_sum: torch.Tensor | None = None,
    wpo_chosen_weights: torch.Tensor | None = None,
    wpo_rejected_weights: torch.Tensor | None = None,
    policy_chosen_log_sum_p2: torch.Tensor | None = None,
    policy_rejected_log_sum_p2: torch.Tensor | None = None,
    validate: bool = True,
    **loss_options: Unpack[LossOptions],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family preference loss with TRL 1.16 ``DPOTrainer`` semantics, and TRL's reward metrics.

    ``loss = sum_k loss_weights[k] * mean_pairs(loss_k)`` over ``loss_type`` (a name or a list, see
    :data:`~fastdpo.losses.LOSS_TYPES`); the formulas are in ``LOSSES.md``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` float, summed completion log-probs of the policy
            (LD-weighted for LD-DPO, see :func:`~fastdpo.losses.ld_logps`).
        ref_chosen_logps, ref_rejected_logps: ``[P]`` float reference log-probs, or ``None`` for a reference-free
            objective (reference log-probs taken as 0, like Liger's ``use_ref_model=False``).
        loss_config: a :class:`~fastdpo.losses.PreferenceLossConfig` (without ``ld_alpha``), or
        loss_options: its fields as keywords (``loss_type``, ``beta``, ``use_weighting``, ...;
            :class:`~fastdpo.losses.LossOptions`, documented and defaulted by the config). With ``loss_config``, a
            keyword given as well must agree with it (:meth:`~fastdpo.losses.PreferenceLossConfig.resolve`).
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (int or float; clamped at 1), required by
            ``ipo``, ``sigmoid_norm``, ``sft`` (chosen only) and by WPO from log-sum-p2 sums.
        policy_chosen_nll_sum, policy_rejected_nll_sum: ``[P]`` plain (un-LD-weighted) per-sequence sums of
            ``-log p``; default ``-policy_*_logps``. ``sft`` uses the chosen one: ``sum(nll) / sum(chosen_lengths)``
            over the batch (0 if the batch has no chosen tokens, where TRL gives NaN).
        wpo_chosen_weights, wpo_rejected_weights: ``[P]`` ready WPO weights (e.g. from
            :func:`~fastdpo.losses.wpo_weights`), or
        policy_chosen_log_sum_p2, policy_rejected_log_sum_p2: ``[P]`` per-sequence sums over completion tokens of
            ``log sum_v p_v^2``; then ``w = exp((sum log p - sum log sum p^2) / max(len, 1))`` with the lengths and the
            plain log-prob sums (``-nll_sum``). WPO multiplies each pair's loss by ``w_c * w_r`` (no gradient).
        validate: warn (``RuntimeWarning``) when the loss or a metric is NaN/inf (one host sync); NaN inputs
            always propagate to the loss, never replaced. ``False`` skips the check.

    Returns:
        ``(loss, metrics)``: 0-dim float32 loss (float64 for float64 inputs) with a grad_fn; metrics dict with
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected`` (detached 0-dim tensors).

    Raises:
        ValueError: invalid configuration (see :class:`~fastdpo.losses.PreferenceLossConfig`), a keyword that
            conflicts with ``loss_config``, missing lengths/WPO inputs, empty batch, mismatched shapes or devices.
            TypeError: non-float log-probs, non-integer/float lengths, a keyword that is no loss option.
    """
    config = sequence_config(PreferenceLossConfig.resolve(loss_config, loss_options, where="preference_loss()"))
    arguments = locals()  # the per-batch tensors are the parameters named as PairStatistics' keys
    statistics = PairStatistics(**{name: arguments[name] for name in PairStatistics.__annotations__})
    x = _prepared(config, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, statistics)
    num_chosen_tokens = None
    if "sft" in config.loss_type:
        assert chosen_lengths is not None
        num_chosen_tokens = chosen_lengths.to(x.pc.dtype).sum().clamp(min=1.0)
    loss = x.loss_sum(config, x.pc.shape[0], num_chosen_tokens)
    metrics = dpo_metrics(x.pc, x.pr, x.rc, x.rr, config.beta)
    return checked_output(loss, metrics, validate, "policy or reference log-probs")


def partial_preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_config: PreferenceLossConfig,
    num_pairs: int,
    num_chosen_tokens: torch.Tensor | None = None,
    validate: bool = True,
    **statistics: Unpack[PairStatistics],
) -> torch.Tensor:
    """The contribution of a subset of ``k`` pairs to the batch's :func:`preference_loss` (the losses of disjoint
    subsets covering the batch add up to it); inputs (``statistics``: :class:`PairStatistics`) as
    :func:`preference_loss` but ``[k]``.

    Needs ``loss_config.pair_local`` and the batch totals: ``num_pairs`` ``P`` and, for ``sft``,
    ``num_chosen_tokens`` (the batch's chosen completion tokens, clamped at 1). ``validate`` warns when the
    contribution is non-finite. Returns a 0-dim tensor with a grad_fn.
    """
    check_statistics_names(statistics, "partial_preference_loss()")
    config = sequence_config(loss_config)
    if not config.pair_local:
        raise ValueError(
            f"loss_type {list(config.loss_type)} (use_weighting={config.use_weighting}) couples the "
            "pairs of a batch: use preference_loss on the whole batch"
        )
    if "sft" in config.loss_type and num_chosen_tokens is None:
        raise ValueError("loss_type 'sft' averages over the batch's chosen tokens: pass num_chosen_tokens")
    x = _prepared(config, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, statistics)
    loss = x.loss_sum(config, num_pairs, num_chosen_tokens)
    if validate:
        warn_nonfinite_output(loss.detach().reshape(1).double(), "policy or reference log-probs", "loss")
    return loss
