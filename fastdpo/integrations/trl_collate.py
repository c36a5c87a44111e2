"""Batches in and predictions out of :class:`~fastdpo.integrations.trl.FastDPOTrainer`.

In: TRL's tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optionally ``ref_chosen_logps`` /
``ref_rejected_logps``) are collated by a :class:`fastdpo.collator.PreferenceCollator` (:class:`TrainerCollator`,
configured from ``DPOConfig`` or from TRL's own ``DataCollatorForPreference``), plus TRL's ``num_tokens`` count.

Out: what ``trainer.predict(...)`` returns instead of TRL's ``[2P, L, V]`` logits -- per preference pair a float32
``[P, 6]`` row with the columns :data:`PREDICTION_COLUMNS` (:func:`pair_predictions`) -- and TRL's label ids, the
``[2P, L]`` int64 token ids of every sequence whatever the packing (:func:`sequence_token_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fastdpo.collator import PreferenceCollator

if TYPE_CHECKING:
    from fastdpo.integrations.trl import FastDPOTrainer

__all__ = ["PREDICTION_COLUMNS", "TrainerCollator", "collator_pad_id", "pair_predictions", "sequence_token_ids"]

#: the columns of ``trainer.predict(...).predictions`` (``[P, 6]`` float32, one row per preference pair)
PREDICTION_COLUMNS: tuple[str, ...] = (
    "chosen_logps",
    "rejected_logps",
    "chosen_rewards",
    "rejected_rewards",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


class TrainerCollator:
    """Data collator for the trainer: a :class:`PreferenceCollator` built on first use from the trainer's tokenizer
    (TRL resolves the processing class inside ``DPOTrainer.__init__``) and the ``DPOConfig`` truncation options.

    Rows are TRL's tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optionally ``ref_chosen_logps``
    / ``ref_rejected_logps``); the batch is the collator's (see :mod:`fastdpo.collator`) plus ``num_tokens`` (int:
    prompt+completion tokens of both sequences of every pair after truncation, what TRL counts in ``num_tokens``).

    With ``trl_collator`` (TRL's ``DataCollatorForPreference`` passed as ``data_collator``), its ``max_length``,
    ``truncation_mode``, ``pad_to_multiple_of`` and ``pad_token_id`` replace the ``DPOConfig`` ones, so the rows are
    cut and padded as TRL's collator would cut and pad them.
    """

    def __init__(
        self,
        trainer: FastDPOTrainer,
        args: DPOConfig,
        packing: str,
        trl_collator: DataCollatorForPreference | None = None,
    ) -> None:
        self._trainer = trainer
        self._args = args
        self.packing = packing
        self.trl_collator = trl_collator
        self._collator: PreferenceCollator | None = None

    @property
    def collator(self) -> PreferenceCollator:
        if self._collator is None:
            source = self.trl_collator if self.trl_collator is not None else self._args
            pad_to = source.pad_to_multiple_of if isinstance(source.pad_to_multiple_of, int) else None
            self._collator = PreferenceCollator(
                self._trainer._tokenizer,
                max_length=source.max_length,
                truncation_mode=source.truncation_mode,
                packing=self.packing,
                pad_to_multiple_of=pad_to,
            )
            if self.trl_collator is not None:
                self._collator.pad_token_id = int(self.trl_collator.pad_token_id)
        return self._collator

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        tokens = int(batch["attention_mask"].sum())
        if self.packing == "prefix_shared":  # TRL feeds each pair's prompt twice (once per completion)
            tokens += int((batch["token_role"] == 0).sum())
        batch["num_tokens"] = tokens
        return batch


def collator_pad_id(collator: Any) -> int:
    """The pad token id the label ids of :func:`sequence_token_ids` are padded with: the trainer collator's, else the
    ``pad_token_id`` of the collator the user passed (0 when it has none)."""
    if isinstance(collator, TrainerCollator):
        return collator.collator.pad_token_id
    return int(getattr(collator, "pad_token_id", 0))


def pair_predictions(pairs: list[torch.Tensor], num_pairs: int, beta: float) -> torch.Tensor:
    """The ``[P, 6]`` predictions (:data:`PREDICTION_COLUMNS`) from the engine's per-pair log-probs ``pairs``: one
    ``[P, 4]`` tensor (policy chosen, policy rejected, reference chosen, reference rejected); rewards are
    ``beta * (policy - reference)``. ``RuntimeError`` when ``pairs`` is not exactly that one tensor."""
    if len(pairs) != 1 or pairs[0].shape != (num_pairs, 4):
        raise RuntimeError(
            f"FastDPOTrainer: expected the engine's [P, 4] per-pair log-probs, got {[list(t.shape) for t in pairs]}"
        )
    pc, pr, rc, rr = pairs[0].unbind(1)
    return torch.stack([pc, pr, beta * (pc - rc), beta * (pr - rr), rc, rr], dim=1)


def sequence_token_ids(batch: Mapping[str, Any], pad_token_id: int) -> torch.Tensor:
    """TRL's ``input_ids`` layout of a collated batch of any packing: ``[2P, L]`` int64, row ``s`` the tokens of
    sequence ``s`` (prompt + completion; chosen of pair ``i`` is ``i``, rejected ``P + i``), right-padded with
    ``pad_token_id`` to the longest sequence (what TRL's ``prediction_step`` returns as label ids)."""
    p = int(batch["num_pairs"])
    ids, seq, role, pair = (batch[k].reshape(-1) for k in ("input_ids", "token_seq", "token_role", "token_pair"))
    shared_prompt = batch.get("packing") == "prefix_shared"  # prompt tokens carry the chosen id in that layout
    rows = []
    for s in range(2 * p):
        i, k = s % p, s // p
        prompt = (role == 0) & (pair == i) & ((seq == i) if shared_prompt else (seq == s))
        rows.append(ids[prompt | ((role == 1 + k) & (seq == s))])
    width = max(1, max(r.numel() for r in rows))
    out = torch.full((2 * p, width), pad_token_id, dtype=torch.long, device=ids.device)
    for s, r in enumerate(rows):
        out[s, : r.numel()] = r
    return out
