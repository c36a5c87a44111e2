"""The fused head's call options, checked once: :class:`HeadOptions` (logit transform, tiles, budget, backend,
label checks, ZeRO-3 gathering), the statistics a call returns (:class:`_Returns`), :func:`head_keywords`, the one
reading of the keywords that the public head functions and the naive oracle take as ``**head_options``, and
:func:`advertise_head_keywords`, which shows those keywords in the functions' signatures.

The transform of a call is ``z = softcap * tanh(logit_scale * x / softcap) / temperature`` (``logit_scale * x /
temperature`` without a softcap), for raw logits ``x = hidden @ weight.T + bias``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, TypeVar

import torch

from fastdpo._dispatch import Backend
from fastdpo._validation import check_int, check_keywords
from fastdpo.head.checks import _check_positive
from fastdpo.head.gather import GatherContext
from fastdpo.head.plan import _check_keep_bytes, _check_tiles, _legacy_tiles, _plan, _Spec

__all__ = [
    "HeadKeywords",
    "HeadOptionKeywords",
    "HeadOptions",
    "TokenStatsKeywords",
    "advertise_head_keywords",
    "head_keywords",
]


@dataclass(frozen=True)
class HeadOptions:
    """Options of one fused-head call; each is checked when the object is made (``TypeError`` / ``ValueError``).

    ``ignore_index``: the label of unscored positions (an int). ``softcap`` (``None`` or > 0), ``logit_scale`` and
    ``temperature`` (> 0): the logit transform (module docstring). ``token_tile`` / ``vocab_tile``: the projection
    tile (``None`` or an int >= 1; ``None`` picks it from the shapes and device). ``validate``: the label (and segment
    id) range checks and the non-finite warning. ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    ``gather_context``: ``None`` or a callable returning a context manager inside which a ZeRO-3 partitioned
    ``weight`` / ``bias`` hold their full values. ``keep_logits_bytes``: raw logits kept between the sweeps (``None``:
    the mode's default budget, else an int >= 0).
    """

    ignore_index: int = -100
    softcap: float | None = None
    logit_scale: float = 1.0
    temperature: float = 1.0
    token_tile: int | None = None
    vocab_tile: int | None = None
    validate: bool = True
    backend: Backend = "auto"
    gather_context: GatherContext | None = None
    keep_logits_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_positive("softcap", self.softcap, allow_none=True)
        _check_positive("logit_scale", self.logit_scale, allow_none=False)
        _check_positive("temperature", self.temperature, allow_none=False)
        check_int("ignore_index", self.ignore_index)
        _check_tiles(self.token_tile, self.vocab_tile)
        if self.gather_context is not None and not callable(self.gather_context):
            raise TypeError("gather_context must be a callable returning a context manager")
        _check_keep_bytes(self.keep_logits_bytes)

    def keep_bytes(self, default: int) -> int:
        """``keep_logits_bytes``, or the mode's ``default`` budget when it is ``None``."""
        return default if self.keep_logits_bytes is None else self.keep_logits_bytes

    def spec(self, n: int, vocab: int, device: torch.device, backend: str) -> _Spec:
        """The transform and tile shape of a sweep over ``n`` labelled tokens, on the concrete ``backend``."""
        tok, voc = _plan(n, vocab, device, token_tile=self.token_tile, vocab_tile=self.vocab_tile)
        softcap = None if self.softcap is None else float(self.softcap)
        return _Spec(float(self.logit_scale), softcap, float(self.temperature), tok, voc, backend)


class _Returns(NamedTuple):
    """Which per-token statistics a call returns (the ``return_*`` keywords of ``linear_token_logprobs``)."""

    entropy: bool = False
    log_sum_p2: bool = False
    mean_logit: bool = False
    argmax_hit: bool = False

    @property
    def stats(self) -> bool:
        """Whether the fold computes the softmax statistics (entropy, ``log sum p^2``, mean logit)."""
        return self.entropy or self.log_sum_p2 or self.mean_logit


class HeadOptionKeywords(TypedDict, total=False):
    """The :class:`HeadOptions` fields as keywords, for type checkers (``**head_options:
    Unpack[HeadOptionKeywords]``): names and types only; meaning, defaults and checks are :class:`HeadOptions`'s."""

    ignore_index: int
    softcap: float | None
    logit_scale: float
    temperature: float
    token_tile: int | None
    vocab_tile: int | None
    validate: bool
    backend: Backend
    gather_context: GatherContext | None
    keep_logits_bytes: int | None


class HeadKeywords(HeadOptionKeywords, total=False):
    """:class:`HeadOptionKeywords` and the deprecated ``chunk_size``: the ``**head_options`` of
    :func:`~fastdpo.head.linear_token_logprobs` and :func:`~fastdpo.head.linear_sequence_logprobs`."""

    chunk_size: int | tuple[int, int] | None


class TokenStatsKeywords(HeadKeywords, total=False):
    """:class:`HeadKeywords` and the ``return_*`` flags of :func:`~fastdpo.head.linear_token_logprobs`: the keywords
    of the naive oracle :func:`fastdpo.reference.naive_linear_token_logprobs`."""

    return_entropy: bool
    return_log_sum_p2: bool
    return_mean_logit: bool
    return_argmax_hit: bool


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(HeadOptions))
_RETURN_KEYWORDS = {f"return_{name}": name for name in _Returns._fields}


def head_keywords(where: str, keywords: dict[str, Any], *, returns: bool = False) -> tuple[HeadOptions, _Returns]:
    """``(HeadOptions, _Returns)`` from the ``**head_options`` of the public function ``where`` (which calls this
    directly): the :class:`HeadOptions` fields, the deprecated ``chunk_size`` (``DeprecationWarning`` pointing at the
    caller of ``where``; see :func:`~fastdpo.head.plan._legacy_tiles`) and, with ``returns``, the ``return_*``
    flags. Any other keyword is a ``TypeError``, as for an explicit signature."""
    allowed = [*_OPTION_NAMES, "chunk_size", *(_RETURN_KEYWORDS if returns else ())]
    check_keywords(f"{where}()", keywords, allowed, "its keywords")
    options = {k: v for k, v in keywords.items() if k in _OPTION_NAMES}
    if "chunk_size" in keywords:
        tiles = _legacy_tiles(
            where, keywords["chunk_size"], options.get("token_tile"), options.get("vocab_tile"), stacklevel=4
        )
        options["token_tile"], options["vocab_tile"] = tiles
    flags = _Returns(**{name: bool(keywords[k]) for k, name in _RETURN_KEYWORDS.items() if k in keywords})
    return HeadOptions(**options), flags


_F = TypeVar("_F", bound=Callable[..., Any])


def advertise_head_keywords(*, chunk_size: bool) -> Callable[[_F], _F]:
    """Decorator: ``inspect.signature`` (and ``help``) of the decorated function show the keywords its
    ``**head_options`` accepts as keyword-only parameters with their defaults: the :class:`HeadOptions` fields and,
    with ``chunk_size``, the deprecated ``chunk_size``. The function itself is returned unchanged
    (:func:`head_keywords` reads the keywords at each call)."""
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    advertised = [
        inspect.Parameter(f.name, keyword_only, default=f.default, annotation=f.type)
        for f in dataclasses.fields(HeadOptions)
    ]
    if chunk_size:
        advertised.append(inspect.Parameter("chunk_size", keyword_only, default=None, annotation="int | tuple | None"))

    def decorate(fn: _F) -> _F:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = signature.replace(parameters=[*own, *advertised])  # type: ignore[attr-defined]
        return fn

    return decorate
