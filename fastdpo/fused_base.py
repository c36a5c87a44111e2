"""What every fused LM-head drop-in loss module shares: the head options, the compaction of a target's scored
positions, per-row log-probs through the fused head, logit sums by linearity, and the input checks.

A fused module takes ``_input [R, T, D]``, ``lin_weight [V, D]`` and ``target [R, T]`` (``_input[r, t]`` scores
``target[r, t]``; no shift). Only positions whose target is not ``ignore_index`` reach the head
(:func:`fastdpo.head.linear_sequence_logprobs`), which tiles tokens x vocabulary, so no ``[R, T, V]`` logits block
ever exists; sums of logits over positions and vocabulary are exact by linearity,
``sum_{t,v} (h_t . W_v + b_v) = (sum_t h_t) . (sum_v W_v) + T sum_v b_v``, again without logits. A row without any
scored position has log-prob 0 (Liger: NaN with ``average_log_prob``).
"""

from __future__ import annotations

from typing import TypedDict

import torch

from fastdpo._validation import check_float, check_int, check_rows_and_target
from fastdpo.head.plan import _legacy_tiles

__all__ = ["HEAD_OPTIONS", "FusedHeadModule", "FusedHeadKeywords", "RowTokens", "row_logit_sums"]

# The head's options every fused module keeps as attributes of its own name and passes on to the head.
HEAD_OPTIONS = ("ignore_index", "token_tile", "vocab_tile", "keep_logits_bytes", "validate", "backend")


class FusedHeadKeywords(TypedDict, total=False):
    """Keyword-only head options of every fused module (defaults: :class:`FusedHeadModule`'s constructor).

    ``token_tile`` / ``vocab_tile``: the head's projection tile (``head_chunk_size`` is their deprecated spelling: an
    int is the vocabulary tile, a tuple both); ``keep_logits_bytes``: raw logits the head may keep for its backward
    (default: the head's bounded budget; 0 keeps none); ``validate``: the head's label range check and non-finite
    warning (one sync each; with ``False`` a target outside the vocabulary gives a NaN log-prob and a zero gradient
    row); ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    token_tile: int | None
    vocab_tile: int | None
    keep_logits_bytes: int | None
    validate: bool
    backend: str
    head_chunk_size: int | tuple[int, int] | None


class RowTokens:
    """The scored positions of a ``target [R, T]``, compacted for the head (one host sync for the count):
    ``index [M]`` flat positions ``r * T + t``, their ``labels [M]``, row ids ``seq_ids [M]``, ``num_seqs = R`` and
    the ``counts [R]`` int64 of scored positions per row."""

    def __init__(self, target: torch.Tensor, ignore_index: int) -> None:
        rows, t = target.shape
        flat = target.reshape(-1)
        self.index = (flat != ignore_index).nonzero().squeeze(1)
        self.labels = flat.index_select(0, self.index)
        self.seq_ids = torch.div(self.index, t, rounding_mode="floor")
        self.num_seqs = rows
        self.counts = torch.bincount(self.seq_ids, minlength=rows)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[M, D]`` hidden states of the scored positions of ``x [R, T, D]``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)


def row_logit_sums(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[R]`` fp32 sums of every logit of each row of ``x [R, T, D]`` (all positions, padding included, and the
    vocabulary), by linearity and without logits; no grad."""
    with torch.no_grad():
        # fp32 accumulation without fp32 copies of the input or the weight
        sums = x.sum(dim=1, dtype=torch.float32) @ weight.sum(dim=0, dtype=torch.float32)
        if bias is not None:
            sums = sums + x.shape[1] * bias.sum(dtype=torch.float32)
        return sums


class FusedHeadModule(torch.nn.Module):
    """Base of the fused modules: the head options (:class:`FusedHeadKeywords`) as attributes, the checks of the inputs,
    and per-row log-probs through the head.

    ``compiled`` and ``chunk_size`` (Liger's rows per chunk) are accepted for signature compatibility only: the head
    tiles tokens x vocabulary on its own and needs no ``torch.compile``. Subclasses set ``use_ref_model`` and
    ``average_log_prob``, and ``_init_depth``: the constructors between the user's call and this one (so that the
    deprecation warning of ``head_chunk_size`` points at the user's line).
    """

    use_ref_model: bool = False
    average_log_prob: bool = False
    _init_depth: int = 1

    def __init__(
        self,
        ignore_index: int,
        compiled: bool,
        chunk_size: int,
        *,
        token_tile: int | None = None,
        vocab_tile: int | None = None,
        keep_logits_bytes: int | None = None,
        validate: bool = True,
        backend: str = "auto",
        head_chunk_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        token_tile, vocab_tile = _legacy_tiles(
            type(self).__name__,
            head_chunk_size,
            token_tile,
            vocab_tile,
            old="head_chunk_size",
            stacklevel=3 + self._init_depth,
        )
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.compiled = bool(compiled)  # accepted for Liger compatibility; nothing to compile
        self.chunk_size = chunk_size  # Liger's rows per chunk; the fused head tiles on its own (vocab_tile)
        self.token_tile, self.vocab_tile = token_tile, vocab_tile
        self.keep_logits_bytes = keep_logits_bytes
        self.validate = bool(validate)
        self.backend = backend

    def _head_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in HEAD_OPTIONS}

    def _check(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, rows: str, *, nonempty: bool
    ) -> None:
        """``_input [R, T, D]`` (``rows`` as the message names ``R``), ``lin_weight [V, D]``, ``target [R, T]``."""
        check_rows_and_target(_input, lin_weight, target, rows, nonempty=nonempty)
        if lin_weight.dim() != 2 or lin_weight.shape[1] != _input.shape[2]:
            raise ValueError(f"lin_weight must be [V, {_input.shape[2]}], got {list(lin_weight.shape)}")

    def _check_ref(self, _input: torch.Tensor, ref_input: torch.Tensor | None, ref_weight: torch.Tensor | None) -> None:
        """With ``use_ref_model``: ``ref_input`` (float, of ``_input``'s shape) and ``ref_weight`` are given."""
        if not self.use_ref_model:
            return
        if ref_input is None or ref_weight is None:
            raise ValueError("use_ref_model=True needs ref_input and ref_weight")
        check_float("ref_input", ref_input)
        if ref_input.shape != _input.shape:
            raise ValueError(f"ref_input must have shape {list(_input.shape)}, got {list(ref_input.shape)}")

    def _row_sums(
        self, rows: RowTokens, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``[R]`` fp32 summed target log-probs of the rows of ``x [R, T, D]``."""
        from fastdpo.head.function import linear_sequence_logprobs

        return linear_sequence_logprobs(
            rows.hidden(x),
            weight,
            rows.labels,
            bias=bias,
            segment_ids=rows.seq_ids,
            num_segments=rows.num_seqs,
            **self._head_kwargs(),
        )

    def _as_loss_logps(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The log-probs the loss uses: the sums, or their means over the scored positions with ``average_log_prob``
        (0 for a row without any)."""
        return sums / counts.clamp(min=1).to(sums.dtype) if self.average_log_prob else sums
