"""Drop-in loss modules: :class:`DPOLoss` over precomputed log-probs (:mod:`fastdpo.dpo_loss`, re-exported here), and
fused LM-head preference losses (what they share with the KTO module: :mod:`fastdpo.fused_base`).

The fused modules take the same constructor options and call as Liger 0.8.5's chunked losses
(``LigerFusedLinearDPOLoss``, ``...SimPOLoss``, ``...CPOLoss``, ``...ORPOLoss``; ``...KTOLoss`` is
:class:`fastdpo.fused_kto.FusedLinearKTOLoss`, re-exported here; the functional forms are in
:mod:`fastdpo.functional`) and return the same structure, so swapping the import is the whole migration::

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards, *extra) = module(lin_weight, _input, target, bias, ...)

``_input`` is ``[2B, T, D]`` with the B chosen rows first, ``target`` ``[2B, T]``; ``_input[b, t]`` scores
``target[b, t]`` (no shift, as in Liger: shift before calling). Only positions whose target is not ``ignore_index``
reach the head (:func:`fastdpo.head.linear_sequence_logprobs`), which tiles tokens x vocabulary, so no
``[2B, T, V]`` (or ``[2, T, V]``) logits block ever exists. ``*_logits_mean`` (mean logit over every position and the
vocabulary, padding included, as Liger defines it) is computed exactly by linearity, ``sum(h) . sum_v W_v``, without
logits.

Differences from Liger (documented, deliberate): a row without any target token has log-prob 0 (Liger: NaN with
``average_log_prob``), and an NLL term over zero chosen tokens is 0 (Liger: NaN). The ``compiled`` and
``chunk_size`` (Liger's pairs per chunk) options are accepted for signature compatibility only: the fused head tiles
tokens x vocabulary on its own (``token_tile`` / ``vocab_tile`` fix the tile) and needs no ``torch.compile``.

The loss formulas are those of :mod:`fastdpo.losses` (the paired zoo through :func:`fastdpo.losses.dpo_loss_sum`, the
reference-free per-pair terms of :mod:`fastdpo.losses.reference_free`), evaluated on the rows' log-probs.

``grad_in_forward=True`` forms the head's gradients during the forward (3 GEMMs instead of 4) for every pair-local
loss (:func:`fastdpo.losses.is_pair_local`; :func:`fastdpo.head.linear_logprobs_loss_grad_in_forward`,
one group per pair, :func:`fastdpo.segments.pair_groups`); the batch-coupled ``aot``/``aot_unpaired`` use the
recompute path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch
import torch.nn.functional as F

from fastdpo._validation import check_index, check_same_device
from fastdpo.dpo_loss import DPOLoss
from fastdpo.fused_base import FusedHeadKeywords, FusedHeadModule, RowTokens, row_logit_sums
from fastdpo.fused_kto import FusedLinearKTOLoss
from fastdpo.losses import (
    LOSS_TYPES,
    PreferenceLossConfig,
    check_label_smoothing,
    cpo_pair_losses,
    dpo_loss_sum,
    orpo_log_odds,
    orpo_pair_losses,
    simpo_pair_losses,
)
from fastdpo.losses.config import resolve_loss_config
from fastdpo.segments import pair_groups

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DPOLoss",
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
]


class PairedHeadKeywords(FusedHeadKeywords, total=False):
    """Keyword-only options of the paired fused modules: :class:`~fastdpo.fused_base.FusedHeadKeywords` and
    ``logit_scale``, ``temperature`` (logits ``(h @ W.T + b) * logit_scale / temperature``), ``grad_in_forward``
    (gradients formed in the forward pass; pair-local losses only; ``keep_logits_bytes`` then bounds the logits one
    chunk of pairs keeps). Defaults: :class:`_FusedLinearPreferenceBase`'s constructor."""

    logit_scale: float
    temperature: float
    grad_in_forward: bool


class _DPOLossKeywords(TypedDict, total=False):
    """The loss options :class:`FusedLinearDPOLoss` takes beyond Liger's (fields of
    :class:`~fastdpo.losses.PreferenceLossConfig`, which documents and defaults them)."""

    loss_weights: Sequence[float] | None
    f_divergence_type: str
    f_alpha_divergence_coef: float


class FusedDPOKeywords(PairedHeadKeywords, _DPOLossKeywords, total=False):
    """Keyword-only options of :class:`FusedLinearDPOLoss`."""


class _Pairs(NamedTuple):
    """What a loss sees of a subset of pairs: ``c``/``r`` ``[k]`` fp32 log-probs as the loss uses them (averaged when
    ``average_log_prob``), reference ``ref_c``/``ref_r`` ``[k]`` or None, target token counts ``cnt_c``/``cnt_r``
    ``[k]`` int64, the chosen NLL sums ``nll_c`` ``[k]``, and the batch totals ``num_pairs`` and
    ``num_chosen_tokens`` (0-dim fp32) that normalize the batch mean."""

    c: torch.Tensor
    r: torch.Tensor
    ref_c: torch.Tensor | None
    ref_r: torch.Tensor | None
    cnt_c: torch.Tensor
    cnt_r: torch.Tensor
    nll_c: torch.Tensor
    num_pairs: int
    num_chosen_tokens: torch.Tensor


class _FusedLinearPreferenceBase(FusedHeadModule):
    """Shared machinery of the paired modules: policy/reference head passes, NLL, logits means, grad-in-forward
    groups.

    Subclasses define :meth:`_pair_terms` — the loss contribution of a subset of pairs given batch totals — and may
    define :meth:`_extra_outputs`. Keyword-only options: :class:`PairedHeadKeywords`.
    """

    _init_depth = 2

    def __init__(
        self,
        ignore_index: int,
        beta: float,
        alpha: float,
        compute_nll_loss: bool,
        compiled: bool,
        chunk_size: int,
        *,
        logit_scale: float = 1.0,
        temperature: float = 1.0,
        grad_in_forward: bool = False,
        **head_options: Unpack[FusedHeadKeywords],
    ) -> None:
        super().__init__(ignore_index, compiled, chunk_size, **head_options)
        for name, value in (
            ("beta", beta),
            ("alpha", alpha),
            ("logit_scale", logit_scale),
            ("temperature", temperature),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if logit_scale <= 0 or temperature <= 0:
            raise ValueError(f"logit_scale and temperature must be > 0, got {logit_scale}, {temperature}")
        if not beta > 0 or beta == float("inf"):
            raise ValueError(f"beta must be a finite number > 0, got {beta}")
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.compute_nll_loss = bool(compute_nll_loss)
        self.logit_scale = float(logit_scale)
        self.temperature = float(temperature)
        self.grad_in_forward = bool(grad_in_forward)

    # -- subclass hooks ----------------------------------------------------------------------------------------
    def _pair_terms(self, t: _Pairs) -> torch.Tensor:
        """Preference-loss contribution of the pairs in ``t``; the total over disjoint subsets of pairs is the batch
        loss for pair-local losses."""
        raise NotImplementedError

    def _pair_local(self) -> bool:
        return True

    def _extra_outputs(self, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _head_kwargs(self) -> dict:
        return {**super()._head_kwargs(), "logit_scale": self.logit_scale, "temperature": self.temperature}

    def _separate_nll(
        self,
        nll_target: torch.Tensor,
        target: torch.Tensor,
        _input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        p: int,
    ) -> torch.Tensor:
        """Token-mean ``-log p(nll_target)`` over the chosen rows' positions where ``nll_target [2B, T]`` is not
        ``ignore_index`` (Liger's ``nll_target``); 0-dim fp32, differentiable, 0 when no position is scored."""
        from fastdpo.head.function import linear_sequence_logprobs

        check_index("nll_target", nll_target)
        if nll_target.shape != target.shape:
            raise ValueError(
                f"nll_target must have the shape of target {list(target.shape)}, got {list(nll_target.shape)}"
            )
        check_same_device(_input=_input, nll_target=nll_target)
        chosen = RowTokens(nll_target[:p], self.ignore_index)
        total = linear_sequence_logprobs(
            chosen.hidden(_input[:p]),
            weight,
            chosen.labels,
            bias=bias,
            segment_ids=torch.zeros_like(chosen.labels),
            num_segments=1,
            **self._head_kwargs(),
        )
        return -total[0] / chosen.labels.numel() if chosen.labels.numel() else total[0] * 0.0

    def _run(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None,
        ref_input: torch.Tensor | None,
        ref_weight: torch.Tensor | None,
        ref_bias: torch.Tensor | None,
        nll_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check(lin_weight, _input, target, "[2B, T, D] (chosen rows first)", nonempty=False)
        if _input.shape[0] == 0 or _input.shape[0] % 2:
            raise ValueError(f"_input must stack B chosen then B rejected rows (even, > 0), got {_input.shape[0]} rows")
        check_same_device(lin_weight=lin_weight, _input=_input, target=target, bias=bias)
        self._check_ref(_input, ref_input, ref_weight)
        if self.use_ref_model:
            check_same_device(_input=_input, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        batch = RowTokens(target, self.ignore_index)
        p = batch.num_seqs // 2
        counts = batch.counts
        cnt_c, cnt_r = counts[:p], counts[p:]
        n_tok = cnt_c.sum().clamp(min=1).to(torch.float32)
        # Liger's nll_target: the NLL term scores the chosen rows against other labels (its own positions)
        sep_nll = (
            self._separate_nll(nll_target, target, _input, lin_weight, bias, p)
            if nll_target is not None and self.compute_nll_loss
            else None
        )

        ref_c = ref_r = None
        if self.use_ref_model:
            assert ref_input is not None and ref_weight is not None
            with torch.no_grad():
                ref = self._as_loss_logps(self._row_sums(batch, ref_input, ref_weight, ref_bias), counts)
            ref_c, ref_r = ref[:p], ref[p:]

        if self.grad_in_forward and self._pair_local():
            loss, sums = self._grad_in_forward(
                batch, lin_weight, _input, bias, ref_c, ref_r, n_tok, nll=sep_nll is None
            )
        else:
            sums = self._row_sums(batch, _input, lin_weight, bias)
            logps = self._as_loss_logps(sums, counts)
            loss = self._pair_terms(_Pairs(logps[:p], logps[p:], ref_c, ref_r, cnt_c, cnt_r, -sums[:p], p, n_tok))
            if self.compute_nll_loss and sep_nll is None:
                loss = loss + self.alpha * (-sums[:p].sum() / n_tok)
            sums = sums.detach()
        if sep_nll is not None:
            loss = loss + self.alpha * sep_nll

        with torch.no_grad():
            logps = self._as_loss_logps(sums, counts)
            c, r = logps[:p], logps[p:]
            if sep_nll is not None:
                nll = sep_nll.detach()
            else:
                nll = -sums[:p].sum() / n_tok if self.compute_nll_loss else torch.zeros((), device=_input.device)
            rc = c - ref_c if ref_c is not None else c
            rr = r - ref_r if ref_r is not None else r
            # mean logit of each half over its positions and the vocabulary; one pass over the head weight
            row_logits = row_logit_sums(_input, lin_weight, bias) * (self.logit_scale / self.temperature)
            per_half = max(p * _input.shape[1] * lin_weight.shape[0], 1)
            aux = (
                c,
                r,
                row_logits[:p].sum() / per_half,
                row_logits[p:].sum() / per_half,
                nll,
                self.beta * rc,
                self.beta * rr,
                *self._extra_outputs(c, r),
            )
        return loss, aux

    def _grad_in_forward(
        self,
        batch: RowTokens,
        weight: torch.Tensor,
        _input: torch.Tensor,
        bias: torch.Tensor | None,
        ref_c: torch.Tensor | None,
        ref_r: torch.Tensor | None,
        n_tok: torch.Tensor,
        nll: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from fastdpo.head.grad_in_forward import linear_logprobs_loss_grad_in_forward

        p = batch.num_seqs // 2
        counts = batch.counts

        def loss_fn(seq_logps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            is_c = ids < p
            pairs = ids[is_c]
            c_sum, r_sum = seq_logps[is_c], seq_logps[~is_c]  # one pair per group: [i, P + i]
            cnt_c, cnt_r = counts.index_select(0, pairs), counts.index_select(0, pairs + p)
            c, r = self._as_loss_logps(c_sum, cnt_c), self._as_loss_logps(r_sum, cnt_r)
            rc = ref_c.index_select(0, pairs) if ref_c is not None else None
            rr = ref_r.index_select(0, pairs) if ref_r is not None else None
            out = self._pair_terms(_Pairs(c, r, rc, rr, cnt_c, cnt_r, -c_sum, p, n_tok))
            if self.compute_nll_loss and nll:
                out = out + self.alpha * (-c_sum.sum() / n_tok)
            return out

        return linear_logprobs_loss_grad_in_forward(
            batch.hidden(_input),
            weight,
            batch.labels,
            batch.seq_ids,
            batch.num_seqs,
            loss_fn,
            bias=bias,
            groups=pair_groups(p),
            **self._head_kwargs(),
        )


class _ReferenceFreeBase(_FusedLinearPreferenceBase):
    """Liger's call of the reference-free losses (SimPO, CPO, ORPO): ``forward(lin_weight, _input, target, bias)``."""

    def forward(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self._run(lin_weight, _input, target, bias, None, None, None)


def _liger_config_checks(loss_type: str | Sequence[str], label_smoothing: float) -> None:
    """The configuration errors Liger's ``LigerFusedLinearDPOLoss`` raises, in its words (scripts and Liger's own
    tests match on them); everything else is checked by :class:`fastdpo.losses.PreferenceLossConfig`."""
    if not isinstance(loss_type, (str, list, tuple)):
        return  # PreferenceLossConfig names the type error
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    for t in types:
        if isinstance(t, str) and t not in LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {t}. Supported types are: {set(LOSS_TYPES)}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        return  # PreferenceLossConfig names the type error
    if "exo_pair" in types and label_smoothing <= 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")


class FusedLinearDPOLoss(_FusedLinearPreferenceBase):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearDPOLoss`` (same positional constructor options and call).

    ``forward(lin_weight [V, D], _input [2B, T, D], target [2B, T], bias [V] = None, ref_input [2B, T, D] = None,
    ref_weight [V, D] = None, ref_bias [V] = None)`` ->
    ``(loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards [B], rejected_rewards [B]))``; aux outputs are fp32 and detached.

    ``loss = alpha * NLL(chosen) (if compute_nll_loss) + preference loss``, the preference loss being
    :func:`fastdpo.preference_loss` with every TRL 1.16 loss type (Liger's ten plus ``ipo``, ``sigmoid_norm`` and
    ``sft``, which use the rows' target token counts as completion lengths, and ``aot``/``aot_unpaired``), loss
    mixtures (``loss_type`` list + ``loss_weights``) and f-divergences. ``use_ref_model=False``: reference log-probs
    are 0. The positional options are Liger's, with Liger's defaults; the loss options Liger lacks
    (``loss_weights``, ``f_divergence_type``, ``f_alpha_divergence_coef``) are keywords (:class:`FusedDPOKeywords`),
    with the head options. ``loss_config``: a :class:`fastdpo.losses.PreferenceLossConfig` instead of the loss options
    (a loss option given as well must agree with it, one left at its default is not read; WPO and LD-DPO need
    per-token statistics and are refused), kept as ``self.loss_config``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        loss_config: PreferenceLossConfig | None = None,
        **options: Unpack[FusedDPOKeywords],
    ) -> None:
        loss_options = {name: options.pop(name) for name in _DPOLossKeywords.__annotations__ if name in options}
        super().__init__(
            ignore_index=ignore_index,
            beta=loss_config.beta if isinstance(loss_config, PreferenceLossConfig) else beta,
            alpha=alpha,
            compute_nll_loss=compute_nll_loss,
            compiled=compiled,
            chunk_size=chunk_size,
            **options,
        )
        if loss_config is None:
            _liger_config_checks(loss_type, label_smoothing)
        liger = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        config = resolve_loss_config(loss_config, {**liger, **loss_options})
        if config.use_weighting or config.ld_alpha is not None:
            raise ValueError(
                "FusedLinearDPOLoss cannot apply use_weighting (WPO) or ld_alpha (LD-DPO): they need "
                "per-token statistics of the policy; use fastdpo.DPOEngine"
            )
        self.loss_config = config
        self.loss_types, self.loss_weights = config.loss_type, config.loss_weights
        # Liger's attributes
        self.loss_type = (
            loss_type
            if loss_config is None
            else (config.loss_type[0] if len(config.loss_type) == 1 else list(config.loss_type))
        )
        self.use_ref_model = bool(use_ref_model)
        self.average_log_prob = bool(average_log_prob)
        self.label_smoothing = config.label_smoothing
        self.discopop_tau = config.discopop_tau
        self.f_divergence_type = config.f_divergence_type
        self.f_alpha_divergence_coef = config.f_alpha_divergence_coef

    def _pair_local(self) -> bool:
        return self.loss_config.pair_local

    def _pair_terms(self, t: _Pairs) -> torch.Tensor:
        return dpo_loss_sum(
            t.c,
            t.r,
            t.ref_c,
            t.ref_r,
            self.loss_config,
            input_dtype=t.c.dtype,
            chosen_lengths=t.cnt_c,
            rejected_lengths=t.cnt_r,
            chosen_nll_sum=t.nll_c,
            pair_weights=None,
            num_pairs=t.num_pairs,
            num_chosen_tokens=t.num_chosen_tokens,
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self._run(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias)


class FusedLinearSimPOLoss(_ReferenceFreeBase):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearSimPOLoss``: ``forward(lin_weight, _input, target, bias=None)``.

    Loss: ``alpha * NLL(chosen) (if compute_nll_loss) + mean(-(1-eps) log sigma(z) - eps log sigma(-z))`` with
    ``z = beta * (avg_logp_c - avg_logp_r) - gamma`` (average log-probs, as Liger and the SimPO paper; ``gamma`` is
    the absolute margin). Outputs as :class:`FusedLinearDPOLoss`, rewards ``beta * avg_logp``.
    """

    average_log_prob = True

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        **head_options: Unpack[PairedHeadKeywords],
    ) -> None:
        super().__init__(ignore_index, beta, alpha, compute_nll_loss, compiled, chunk_size, **head_options)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.gamma = float(gamma)

    def _pair_terms(self, t: _Pairs) -> torch.Tensor:
        return simpo_pair_losses(t.c, t.r, self.beta, self.gamma, self.label_smoothing).sum() / t.num_pairs


class FusedLinearCPOLoss(_ReferenceFreeBase):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearCPOLoss``: ``forward(lin_weight, _input, target, bias=None)``.

    Loss: ``alpha * NLL(chosen) (if compute_nll_loss) + mean(-(1-eps) log sigma(z) - eps log sigma(-z))``,
    ``z = beta * (logp_c - logp_r)`` (summed log-probs unless ``average_log_prob``). Outputs as
    :class:`FusedLinearDPOLoss`, rewards ``beta * logp``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        **head_options: Unpack[PairedHeadKeywords],
    ) -> None:
        super().__init__(ignore_index, beta, alpha, compute_nll_loss, compiled, chunk_size, **head_options)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.average_log_prob = bool(average_log_prob)

    def _pair_terms(self, t: _Pairs) -> torch.Tensor:
        return cpo_pair_losses(t.c, t.r, self.beta, self.label_smoothing).sum() / t.num_pairs


class FusedLinearORPOLoss(_ReferenceFreeBase):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearORPOLoss``: ``forward(lin_weight, _input, target, bias=None,
    nll_target=None)``.

    Loss: ``NLL(chosen) (if compute_nll_loss) - beta * mean(log sigma(log odds_c - log odds_r))`` on average
    log-probs, ``log odds = a - log(1 - e^a)``. Outputs as :class:`FusedLinearDPOLoss` plus ``log_odds_ratio`` (mean
    ``log sigma``) and ``log_odds_chosen`` (mean log-odds difference); rewards ``beta * avg_logp``. ``nll_target``
    ``[2B, T]`` (as Liger): the NLL term scores the chosen rows against these labels instead of ``target`` (token mean
    over its non-``ignore_index`` positions; one more head pass over them).
    """

    average_log_prob = True

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        **head_options: Unpack[PairedHeadKeywords],
    ) -> None:
        super().__init__(ignore_index, beta, 1.0, compute_nll_loss, compiled, chunk_size, **head_options)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        nll_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self._run(lin_weight, _input, target, bias, None, None, None, nll_target)

    def _pair_terms(self, t: _Pairs) -> torch.Tensor:
        return orpo_pair_losses(t.c, t.r, self.beta).sum() / t.num_pairs

    def _extra_outputs(self, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        log_odds = orpo_log_odds(c, r)
        return F.logsigmoid(log_odds).mean(), log_odds.mean()
