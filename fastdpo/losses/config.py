"""The DPO-family loss configuration: :class:`PreferenceLossConfig`, the loss-type tables, and which losses are
pair-local.

One frozen object holds the options of TRL 1.16's ``DPOTrainer`` loss (``loss_type`` list, ``loss_weights``,
``beta``, ``label_smoothing``, f-divergence, ``discopop_tau``, WPO ``use_weighting``, LD-DPO ``ld_alpha``) and
validates them when it is built, so :func:`fastdpo.losses.preference_loss`, :class:`fastdpo.engine.DPOEngine`, the
:mod:`fastdpo.nn` modules and :class:`fastdpo.integrations.trl.FastDPOTrainer` share one definition of a valid
configuration and its error messages.

Entry points take the options either as one object or as keywords: ``loss_config: PreferenceLossConfig | None = None,
**loss_options: Unpack[LossOptions]``. :class:`PreferenceLossConfig` documents the options and holds their defaults;
:class:`LossOptions` only types the keywords; :meth:`PreferenceLossConfig.resolve` turns the two into one config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from fastdpo._validation import check_keywords
from fastdpo.losses._common import check_scalar

if TYPE_CHECKING:
    from typing_extensions import Unpack

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

LABEL_SMOOTHING_LOSS_TYPES: frozenset[str] = frozenset({"exo_pair", "robust", "aot", "aot_unpaired"})
"""Loss types that read ``label_smoothing`` (every other type ignores it, so a nonzero value with none of these
raises)."""

BATCH_COUPLED_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})
"""Loss types whose per-pair value depends on other pairs (they sort over the batch)."""

LENGTH_LOSS_TYPES: frozenset[str] = frozenset({"ipo", "sigmoid_norm", "sft"})
"""Loss types that need completion token counts."""


def is_pair_local(loss_types: Sequence[str], *, use_weighting: bool = False) -> bool:
    """Whether the batch loss is a sum of per-pair terms once the batch totals are known.

    With ``P`` pairs and ``N`` chosen completion tokens in the batch, every loss type but the batch-coupled ones
    (:data:`BATCH_COUPLED_LOSS_TYPES`, which sort over the batch) is ``sum_i term_i / P`` -- ``sft`` included:
    ``sum_i nll_i / N``. WPO (``use_weighting``) keeps that form (``w_i * term_i``) except for ``sft``, whose weighted
    term ``(sum_i nll_i / N) * (sum_i w_i / P)`` is a product of two batch sums. Pair-local losses can be evaluated
    pair by pair (grad-in-forward groups ``[i, P+i]``) with :func:`fastdpo.losses.dpo_loss_sum` given the totals.
    """
    types = set(loss_types)
    if types & BATCH_COUPLED_LOSS_TYPES:
        return False
    return not (use_weighting and "sft" in types)


def check_label_smoothing(label_smoothing: object) -> float:
    """``label_smoothing`` as a float in ``[0, 1)``; ``TypeError``/``ValueError`` naming it otherwise."""
    eps = check_scalar("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {eps}")
    return eps


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    """A validated DPO-family loss configuration (TRL 1.16 ``DPOConfig`` semantics; formulas in ``LOSSES.md``).

    Attributes (normalized at construction):
        loss_type: one loss type name or a sequence of them (:data:`LOSS_TYPES`); stored as a tuple.
        loss_weights: one weight per loss type (default all 1); stored as a tuple of floats.
        beta: inverse temperature, ``> 0``.
        label_smoothing: ``eps`` of ``exo_pair`` (> 0), ``robust`` ([0, 1/2)), ``aot``/``aot_unpaired`` ([0, 1)).
        f_divergence_type, f_alpha_divergence_coef: f-DPO scores (:data:`F_DIVERGENCE_TYPES`; non-reverse-KL only
            with :data:`F_DIVERGENCE_LOSS_TYPES`; the coefficient is read by ``"alpha_divergence"`` only).
        discopop_tau: temperature of DiscoPOP's mixing sigmoid (``> 0``; read by ``"discopop"`` only).
        use_weighting: WPO -- each pair's loss times ``w_c * w_r`` (not with ``aot``/``aot_unpaired``).
        ld_alpha: LD-DPO -- weight of the completion tokens past the shorter completion of a pair, in ``[0, 1]``, or
            ``None``. Applied where per-token log-probs exist (:class:`fastdpo.engine.DPOEngine`, or by the caller with
            :func:`fastdpo.losses.ld_logps`); functions of sequence log-probs refuse a config that sets it.

    Raises (at construction) ``ValueError`` for every combination TRL rejects or that is mathematically undefined:
    unknown loss or f-divergence type, ``loss_weights`` of the wrong length, ``exo_pair`` with
    ``label_smoothing == 0``, ``robust`` with ``label_smoothing`` outside ``[0, 1/2)``, a non-reverse-KL f-divergence
    with a loss type outside :data:`F_DIVERGENCE_LOSS_TYPES`, WPO with ``aot``/``aot_unpaired``, ``beta <= 0``,
    ``discopop_tau <= 0``, ``ld_alpha`` outside ``[0, 1]`` -- and for an option no selected loss reads (nonzero
    ``label_smoothing`` without any of :data:`LABEL_SMOOTHING_LOSS_TYPES`, a non-default ``f_alpha_divergence_coef``
    without ``"alpha_divergence"``, a non-default ``discopop_tau`` without ``"discopop"``), which TRL ignores
    silently. ``TypeError`` for options of the wrong type.
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    ld_alpha: float | None = None

    def __post_init__(self) -> None:
        types, weights = _check_types_and_weights(self.loss_type, self.loss_weights)
        beta = check_scalar("beta", self.beta)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        eps = check_label_smoothing(self.label_smoothing)
        if "exo_pair" in types and eps == 0.0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0 (its target distribution is [1-eps, eps]); "
                "the EXO paper recommends 1e-3"
            )
        if "robust" in types and not eps < 0.5:
            raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {eps}")
        f_div = self.f_divergence_type
        if f_div not in F_DIVERGENCE_TYPES:
            raise ValueError(f"Unknown f_divergence_type {f_div!r}: valid are {list(F_DIVERGENCE_TYPES)}")
        if f_div != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"f_divergence_type={f_div!r} is only defined for loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {list(types)}"
            )
        f_alpha = check_scalar("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        tau = check_scalar("discopop_tau", self.discopop_tau)
        if tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {tau}")
        if self.use_weighting and set(types) & BATCH_COUPLED_LOSS_TYPES:
            raise ValueError(
                "use_weighting (WPO) is not defined for 'aot'/'aot_unpaired': they sort pairs across the batch, "
                "which misaligns per-pair weights"
            )
        ld_alpha = self.ld_alpha
        if ld_alpha is not None and not (
            isinstance(ld_alpha, (int, float)) and not isinstance(ld_alpha, bool) and 0.0 <= float(ld_alpha) <= 1.0
        ):
            raise ValueError(f"ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
        # options that no selected loss reads: refused rather than dropped
        if eps != 0.0 and not set(types) & LABEL_SMOOTHING_LOSS_TYPES:
            raise ValueError(
                f"label_smoothing={eps} is read only by loss types {sorted(LABEL_SMOOTHING_LOSS_TYPES)}; "
                f"loss_type {list(types)} would ignore it (leave it at 0)"
            )
        if f_alpha != _DEFAULTS["f_alpha_divergence_coef"] and f_div != "alpha_divergence":
            raise ValueError(
                f"f_alpha_divergence_coef={f_alpha} is read only with f_divergence_type='alpha_divergence'; "
                f"f_divergence_type={f_div!r} would ignore it"
            )
        if tau != _DEFAULTS["discopop_tau"] and "discopop" not in types:
            raise ValueError(
                f"discopop_tau={tau} is read only by loss_type 'discopop'; loss_type {list(types)} would ignore it"
            )
        for name, value in (
            ("loss_type", types),
            ("loss_weights", weights),
            ("beta", beta),
            ("label_smoothing", eps),
            ("f_alpha_divergence_coef", f_alpha),
            ("discopop_tau", tau),
            ("use_weighting", bool(self.use_weighting)),
            ("ld_alpha", None if ld_alpha is None else float(ld_alpha)),
        ):
            object.__setattr__(self, name, value)

    @property
    def pair_local(self) -> bool:
        """:func:`is_pair_local` of this configuration."""
        return is_pair_local(self.loss_type, use_weighting=self.use_weighting)

    def replace(self, **changes: Unpack[LossOptions]) -> PreferenceLossConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(
        cls,
        loss_config: PreferenceLossConfig | None,
        loss_options: Mapping[str, Any],
        *,
        where: str = "PreferenceLossConfig.resolve()",
    ) -> PreferenceLossConfig:
        """The configuration of an entry point taking ``loss_config=`` and ``**loss_options`` (:class:`LossOptions`).

        ``loss_options`` holds the options the caller passed, and only those. Without ``loss_config`` the config is
        built from them (the other fields keep this class's defaults; errors as at construction). With it, every
        passed option must equal the config's field (in any spelling: ``"ipo"`` or ``["ipo"]``, ``1`` or ``1.0``),
        else ``ValueError``. A name that is not a field is a ``TypeError`` naming ``where`` (a misspelt option is never
        dropped); so is a ``loss_config`` that is not a :class:`PreferenceLossConfig`.
        """
        check_keywords(where, loss_options, _FIELDS, "the loss options")
        if loss_config is None:
            return cls(**loss_options)
        if not isinstance(loss_config, PreferenceLossConfig):
            raise TypeError(f"loss_config must be a PreferenceLossConfig, got {type(loss_config).__name__}")
        for name, value in loss_options.items():
            try:
                same = _normalized(name, value) == getattr(loss_config, name)
            except (TypeError, ValueError):
                same = False
            if not same:
                raise ValueError(
                    f"{name}={value!r} conflicts with loss_config.{name}={getattr(loss_config, name)!r}: pass the "
                    "option either in loss_config or as a keyword"
                )
        return loss_config


def config_property(name: str) -> property:
    """A read-only attribute that is the field ``name`` of the owner's ``loss_config`` (the modules and the engine
    keep one :class:`PreferenceLossConfig`, not copies of its fields)."""
    return property(lambda self: getattr(self.loss_config, name), doc=f"``loss_config.{name}`` (read-only)")


class LossOptions(TypedDict, total=False):
    """The fields of :class:`PreferenceLossConfig` as keywords (``**loss_options: Unpack[LossOptions]``): names and
    types only; the options' meaning, defaults and checks are the config's."""

    loss_type: str | Sequence[str]
    loss_weights: Sequence[float] | None
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    discopop_tau: float
    use_weighting: bool
    ld_alpha: float | None


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PreferenceLossConfig))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(PreferenceLossConfig)}


def _check_types_and_weights(loss_type: object, loss_weights: object) -> tuple[tuple[str, ...], tuple[float, ...]]:
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
        return types, (1.0,) * len(types)
    weights = tuple(check_scalar("loss_weights[i]", w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({list(types)}); "
            "give one weight per loss type"
        )
    return types, weights


def _normalized(name: str, value: Any) -> Any:
    """A keyword value in the form the config stores it, for comparing a keyword with a config's field."""
    if name == "loss_type":
        return (value,) if isinstance(value, str) else tuple(value)
    if name == "loss_weights":
        return tuple(float(w) for w in value)
    if name == "use_weighting":
        return bool(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def resolve_loss_config(
    loss_config: PreferenceLossConfig | None, arguments: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> PreferenceLossConfig:
    """:meth:`PreferenceLossConfig.resolve` for an entry point whose loss keywords always hold a value (TRL's
    ``DPOConfig``, Liger's positional constructor), so that a value left at its default cannot be told from one
    passed.

    ``arguments``: the entry point's arguments; the config's field names among them are the loss keywords. Without
    ``loss_config`` all of them build the config. With it, a keyword at its default (``defaults``, the entry point's
    own; the config's otherwise) counts as not passed, and any other must agree with the config.
    """
    keywords = {name: arguments[name] for name in _FIELDS if name in arguments}
    if loss_config is not None:
        default = {**_DEFAULTS, **(defaults or {})}
        keywords = {n: v for n, v in keywords.items() if not (v is default[n] or v == default[n])}
    return PreferenceLossConfig.resolve(loss_config, keywords)


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
    """``(loss_types, loss_weights)`` of a valid configuration; kept for callers of the 0.1 API, use
    :class:`PreferenceLossConfig` (which raises the same errors)."""
    config = PreferenceLossConfig(
        loss_type,
        loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        use_weighting=use_weighting,
    )
    return config.loss_type, config.loss_weights  # type: ignore[return-value]
