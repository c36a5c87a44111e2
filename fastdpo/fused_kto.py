"""Fused LM-head KTO loss: a drop-in for Liger 0.8.5's ``LigerFusedLinearKTOLoss`` (unpaired preferences).

KTO (Ethayarajh et al. 2024) scores single completions labelled desirable or undesirable, so the rows are not
paired as in :mod:`fastdpo.nn`: ``_input [B, T, D]``, ``target [B, T]`` and ``preference_labels [B]`` (bool, True =
desirable). Per row ``r = log pi(y) - log pi_ref(y)`` (summed, or averaged with ``average_log_prob``, over the
positions whose target is not ``ignore_index``; ``r = log pi(y)`` without a reference) and, with the KL estimate
``kl`` (a tensor broadcastable to ``[B]``, computed by the caller as TRL's ``KTOTrainer`` does; none: 0)::

    desirable:   1 - sigmoid(beta * (r - kl))
    undesirable: 1 - sigmoid(beta * (kl - r))
    loss = sum over rows / B

Only the target positions reach the head (:func:`fastdpo.head.linear_sequence_logprobs`), so no
``[B, T, V]`` logits exist; the logits sums Liger reports are computed by linearity, ``sum(h) . sum_v W_v``.
Outputs as Liger's: ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
chosen_rewards_sum, rejected_rewards_sum))``, 0-dim fp32 sums over the desirable / undesirable rows (divide by the
row counts for means; the logits sums by ``count * T * V``), detached.

Differences from Liger (deliberate, as in :mod:`fastdpo.nn`): a row without target tokens has log-prob 0 (Liger: NaN
with ``average_log_prob``); ``compiled`` and ``chunk_size`` are accepted for signature compatibility only.
"""

from __future__ import annotations

import torch

from fastdpo._validation import check_float, check_int, check_number, check_rows_and_target, check_same_device
from fastdpo.head.plan import _legacy_tiles
from fastdpo.losses.kto import kto_sample_losses

__all__ = ["FusedLinearKTOLoss"]

# The head's options every fused module keeps as attributes of its own name and passes on to the head.
HEAD_OPTIONS = ("ignore_index", "token_tile", "vocab_tile", "keep_logits_bytes", "validate", "backend")


class FusedLinearKTOLoss(torch.nn.Module):
    """Drop-in for Liger 0.8.5's ``LigerFusedLinearKTOLoss`` (same positional constructor options and call).

    ``forward(_input [B, T, D], lin_weight [V, D], target [B, T], bias [V] = None, preference_labels [B] bool,
    ref_input [B, T, D] = None, ref_weight [V, D] = None, ref_bias [V] = None, kl = None)`` (note: ``_input`` comes
    first here, as in Liger's KTO module) -> ``(loss, aux)`` as described in :mod:`fastdpo.fused_kto`.

    Keyword-only head options: ``token_tile``, ``vocab_tile``, ``keep_logits_bytes``, ``validate``, ``backend`` (as
    :class:`fastdpo.nn.FusedLinearDPOLoss`; ``head_chunk_size`` is the tiles' deprecated spelling).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
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
            type(self).__name__, head_chunk_size, token_tile, vocab_tile, old="head_chunk_size"
        )
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.beta = check_number("beta", beta)
        self.compiled = bool(compiled)  # accepted for Liger compatibility; nothing to compile
        self.use_ref_model = bool(use_ref_model)
        self.average_log_prob = bool(average_log_prob)
        self.chunk_size = chunk_size  # Liger's rows-per-chunk; the fused head tiles on its own (vocab_tile)
        self.token_tile, self.vocab_tile = token_tile, vocab_tile
        self.keep_logits_bytes = keep_logits_bytes
        self.validate = bool(validate)
        self.backend = backend

    def _row_logps(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        index: torch.Tensor,
        labels: torch.Tensor,
        rows: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """``[B]`` fp32 summed (or averaged) target log-probs of the rows of ``x [B, T, D]``."""
        from fastdpo.head.function import linear_sequence_logprobs

        hidden = x.reshape(-1, x.shape[-1]).index_select(0, index)
        sums = linear_sequence_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            segment_ids=rows,
            num_segments=counts.shape[0],
            **{name: getattr(self, name) for name in HEAD_OPTIONS},
        )
        return sums / counts.clamp(min=1).to(sums.dtype) if self.average_log_prob else sums

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        preference_labels: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        check_rows_and_target(_input, lin_weight, target, "[B, T, D] with B > 0", nonempty=True)
        if lin_weight.dim() != 2 or lin_weight.shape[1] != _input.shape[2]:
            raise ValueError(f"lin_weight must be [V, {_input.shape[2]}], got {list(lin_weight.shape)}")
        b = _input.shape[0]
        if preference_labels is None:
            raise ValueError("preference_labels ([B] bool, True = desirable) must be provided for the KTO loss")
        if (
            not isinstance(preference_labels, torch.Tensor)
            or preference_labels.dtype != torch.bool
            or preference_labels.shape != (b,)
        ):
            raise ValueError(f"preference_labels must be a bool tensor of shape [{b}]")
        if kl is not None:
            check_float("kl", kl)
            if kl.numel() not in (1, b):
                raise ValueError(f"kl must hold 1 or {b} values, got shape {list(kl.shape)}")
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight")
            check_float("ref_input", ref_input)
            if ref_input.shape != _input.shape:
                raise ValueError(f"ref_input must have shape {list(_input.shape)}, got {list(ref_input.shape)}")
        check_same_device(
            _input=_input,
            lin_weight=lin_weight,
            target=target,
            bias=bias,
            preference_labels=preference_labels,
            ref_input=ref_input,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            kl=kl,
        )

        t = target.shape[1]
        flat = target.reshape(-1)
        index = (flat != self.ignore_index).nonzero().squeeze(1)  # [M] flat positions row * T + t
        labels = flat.index_select(0, index)
        rows = torch.div(index, t, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=b)
        logps = self._row_logps(_input, lin_weight, bias, index, labels, rows, counts)
        logratio = logps
        if self.use_ref_model:
            assert ref_input is not None and ref_weight is not None
            with torch.no_grad():
                ref_logps = self._row_logps(ref_input, ref_weight, ref_bias, index, labels, rows, counts)
            logratio = logps - ref_logps
        z0 = kl.detach().to(logratio.dtype).reshape(-1) if kl is not None else 0.0
        loss = kto_sample_losses(logratio, z0, preference_labels, self.beta).sum() / b

        with torch.no_grad():
            want = preference_labels.to(torch.float32)
            rewards = self.beta * logratio.detach()
            row_hidden = _input.sum(dim=1, dtype=torch.float32)  # [B, D]
            col = lin_weight.sum(dim=0, dtype=torch.float32)  # [D]
            row_logits = row_hidden @ col  # [B]: sum over positions and vocabulary of the row's logits
            if bias is not None:
                row_logits = row_logits + t * bias.sum(dtype=torch.float32)
            aux = (
                (logps.detach() * want).sum(),
                (logps.detach() * (1.0 - want)).sum(),
                (row_logits * want).sum(),
                (row_logits * (1.0 - want)).sum(),
                (rewards * want).sum(),
                (rewards * (1.0 - want)).sum(),
            )
        return loss, aux
