"""Preference-batch collation: tokenization like TRL 1.16 ``DPOTrainer``, truncation, and three packings.

``PreferenceCollator(tokenizer, packing=...)(rows)`` turns P preference rows into one batch dict (the "Collated batch"
contract). The 2P sequences are numbered TRL-style: chosen of pair ``i`` is sequence ``i``, rejected is ``P + i``.

Tokenization (reproduces TRL 1.16 ``DPOTrainer._prepare_dataset`` + ``DataCollatorForPreference``):

* strings: EOS *text* is appended to ``chosen``/``rejected`` unless they already end with it; ``prompt``,
  ``prompt + chosen`` and ``prompt + rejected`` are tokenized with ``tokenizer(text=...)`` (special tokens as the
  tokenizer adds them, e.g. a BOS); the prompt is the longest common token prefix of the three (so tokens merging
  across the boundary stay correct), the completions are the rest.
* chat messages: ``apply_chat_template(prompt, add_generation_prompt=True)`` and ``apply_chat_template(prompt +
  chosen)`` (no EOS added: the template ends the turn); same common-prefix split. ``tools`` and
  ``chat_template_kwargs`` row keys are forwarded like TRL does.
* pre-tokenized rows (``prompt_input_ids``/``chosen_input_ids``/``rejected_input_ids``, or TRL's ``prompt_ids``/
  ``chosen_ids``/``rejected_ids``) are used verbatim (no BOS/EOS added).

Truncation (per sequence, prompt + completion): ``max_prompt_length`` keeps the end (``keep_end``) or start
(``keep_start``) of the prompt; ``max_completion_length`` keeps the start of each completion; then ``max_length`` keeps
``seq[-max_length:]`` (``keep_end``) or ``seq[:max_length]`` (``keep_start``), as TRL's collator does. Completions may
end up with zero tokens: legal (log-prob 0).

Packings:

* ``"pad"``: 2P right-padded rows ``[chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]`` -- token for token what
  TRL 1.16 feeds its model.
* ``"padding_free"``: all sequences back to back in one row (or several rows of at most ``max_tokens_per_row``),
  position ids restarting at 0 for each sequence.
* ``"prefix_shared"``: each pair as ``[prompt, chosen, rejected]``; both completions continue the prompt's positions
  and the rejected tokens never attend to chosen tokens (see :mod:`fastdpo.attention`), so the prompt is computed
  once per pair. If ``keep_end`` truncation would cut the prompt differently for chosen and rejected, the pair keeps
  the shorter prompt suffix for both (both sequences then see the same, valid, context; "pad" keeps TRL's
  per-sequence cut) -- a one-time warning says so.

Which hidden state scores which token: a completion token at view index ``k >= 1`` of its sequence (view = prompt +
that completion) is predicted by the hidden state of view index ``k - 1``; a completion token at view index 0 (empty
prompt, or a completion cut at the front) has no predictor and is not scored -- exactly TRL's ``completion_mask[:,
1:]``. In "prefix_shared" the first rejected token is therefore predicted by the last *prompt* token, not the last
chosen one.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

PACKINGS: tuple[str, ...] = ("pad", "padding_free", "prefix_shared")
TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start")

ROLE_PAD, ROLE_PROMPT, ROLE_CHOSEN, ROLE_REJECTED = -1, 0, 1, 2

#: one pair's two sequences, each ``(prompt tokens, completion tokens)``: chosen, then rejected
_Pair = list[tuple[list[int], list[int]]]
#: a run of placed tokens: ``(tokens, seq_id, role, pair, first_position)``
_Run = tuple[list[int], int, int, int, int]

_PRETOKENIZED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
    ("prompt_ids", "chosen_ids", "rejected_ids"),
)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _check_messages(name: str, value: list) -> None:
    for j, m in enumerate(value):
        if "role" not in m or "content" not in m:
            raise ValueError(f"{name}[{j}] must be a chat message with 'role' and 'content' keys, got keys {sorted(m)}")


def _as_id_list(name: str, value: Any, vocab_size: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.ndim != 1:
            raise TypeError(
                f"{name} must be a 1-D integer sequence, got a tensor of shape {tuple(value.shape)} "
                f"and dtype {value.dtype}"
            )
        value = value.tolist()
    elif type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of token ids, got {type(value).__name__}")
    ids = list(value)
    if not all(type(t) is int for t in ids):  # slow path: numpy ints and friends, or garbage
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"{name} must contain ints, got {type(t).__name__}")
            ids[j] = int(t)
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise ValueError(f"{name} contains token id {bad}, outside the tokenizer's vocabulary [0, {vocab_size})")
    return ids


class PreferenceCollator:
    """Collate preference rows into a packed/padded DPO batch (see the module docstring and the batch contract).

    Args:
        tokenizer: a ``transformers`` tokenizer (a chat template is needed only for message rows).
        max_length: per-sequence cap on prompt + completion tokens (``None``: no cap).
        max_prompt_length: cap on prompt tokens, applied first (``keep_end`` keeps its last tokens).
        max_completion_length: cap on each completion's tokens (its first tokens are kept).
        truncation_mode: ``"keep_end"`` or ``"keep_start"`` (what ``max_length`` and ``max_prompt_length`` keep).
        packing: ``"pad"``, ``"padding_free"`` or ``"prefix_shared"``.
        pad_to_multiple_of: round the column count ``L`` up to a multiple of this.
        max_tokens_per_row: packed modes only: start a new row when the next sequence ("padding_free") or pair
            ("prefix_shared") would exceed this many tokens; an item longer than the cap gets a row of its own.
            ``None``: everything in one row.

    Calling it on ``rows`` (list of dicts) returns (P pairs, R rows, L columns, M scored completion tokens):
        ``input_ids``, ``position_ids``, ``attention_mask`` (1 = real token), ``token_seq`` (sequence id; in
        "prefix_shared" prompt tokens carry the chosen id ``i``), ``token_role`` (0 prompt, 1 chosen, 2 rejected),
        ``token_pair`` -- all int64 ``[R, L]``, -1 on padding (``input_ids``: pad id; ``attention_mask``: 0);
        ``logp_index`` (flat ``r * L + t`` of the predicting hidden state), ``logp_labels``, ``logp_seq``,
        ``logp_pos`` -- int64 ``[M]``, ordered by (sequence, position);
        ``chosen_lengths``, ``rejected_lengths`` int64 ``[P]`` (scored tokens per completion), ``num_pairs`` int,
        ``packing`` str; plus ``ref_chosen_logps``/``ref_rejected_logps`` fp32 ``[P]`` when every row has them.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        truncation_mode: str = "keep_end",
        packing: str = "pad",
        pad_to_multiple_of: int | None = None,
        max_tokens_per_row: int | None = None,
    ) -> None:
        if tokenizer is None:
            raise TypeError("tokenizer must be a transformers tokenizer, got None")
        for name, value in (
            ("max_length", max_length),
            ("max_prompt_length", max_prompt_length),
            ("max_completion_length", max_completion_length),
            ("pad_to_multiple_of", pad_to_multiple_of),
            ("max_tokens_per_row", max_tokens_per_row),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if max_prompt_length is not None and max_prompt_length < 0:
            raise ValueError(f"max_prompt_length must be >= 0, got {max_prompt_length}")
        if max_completion_length is not None and max_completion_length < 0:
            raise ValueError(f"max_completion_length must be >= 0, got {max_completion_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if max_tokens_per_row is not None and max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if max_tokens_per_row is not None and packing == "pad":
            raise ValueError("max_tokens_per_row applies to packing='padding_free' or 'prefix_shared', not 'pad'")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.truncation_mode = truncation_mode
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_tokens_per_row = max_tokens_per_row
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id: int = int(pad_id) if pad_id is not None else 0
        self._warned_prompt_cut = False

    # ------------------------------------------------------------------ tokenization
    def tokenize_row(self, row: Mapping[str, Any], index: int = 0) -> tuple[list[int], list[int], list[int]]:
        """Tokenize one row like TRL 1.16: returns ``(prompt_ids, chosen_ids, rejected_ids)`` before truncation."""
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{index}] must be a dict, got {type(row).__name__}")
        vocab_size = len(self.tokenizer)
        for keys in _PRETOKENIZED_KEYS:
            if any(k in row for k in keys):
                missing = [k for k in keys if k not in row]
                if missing:
                    raise ValueError(f"rows[{index}] is pre-tokenized but lacks {missing}")
                return tuple(_as_id_list(f"rows[{index}][{k!r}]", row[k], vocab_size) for k in keys)  # type: ignore
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(
                f"rows[{index}] lacks {missing}: each row needs 'prompt', 'chosen' and 'rejected' (strings or chat "
                f"messages), or pre-tokenized 'prompt_input_ids', 'chosen_input_ids' and 'rejected_input_ids'"
            )
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        kinds = {
            k: ("messages" if _is_messages(v) else "str" if isinstance(v, str) else None)
            for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
        }
        for k, kind in kinds.items():
            if kind is None:
                raise TypeError(
                    f"rows[{index}][{k!r}] must be a string or a non-empty list of chat messages, "
                    f"got {type(row[k]).__name__}"
                )
        if len(set(kinds.values())) != 1:
            raise TypeError(f"rows[{index}] mixes strings and chat messages: {kinds}")
        tok = self.tokenizer
        if kinds["prompt"] == "messages":
            for k in ("prompt", "chosen", "rejected"):
                _check_messages(f"rows[{index}][{k!r}]", row[k])
            if getattr(tok, "chat_template", None) is None:
                raise ValueError(f"rows[{index}] holds chat messages but the tokenizer has no chat_template")
            tools = row.get("tools")
            if isinstance(tools, str):
                import json

                tools = json.loads(tools)
            kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}

            def encode(messages: list, **extra: Any) -> list[int]:
                out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **extra)
                return list(out["input_ids"])

            prompt_ids = encode(list(prompt), add_generation_prompt=True)
            prompt_chosen = encode(list(prompt) + list(chosen))
            prompt_rejected = encode(list(prompt) + list(rejected))
        else:
            eos = getattr(tok, "eos_token", None)
            if eos:
                if not chosen.endswith(eos):
                    chosen = chosen + eos
                if not rejected.endswith(eos):
                    rejected = rejected + eos
            prompt_ids = list(tok(text=prompt)["input_ids"])
            prompt_chosen = list(tok(text=prompt + chosen)["input_ids"])
            prompt_rejected = list(tok(text=prompt + rejected)["input_ids"])
        n = min(_common_prefix_length(prompt_ids, prompt_chosen), _common_prefix_length(prompt_ids, prompt_rejected))
        return prompt_ids[:n], prompt_chosen[n:], prompt_rejected[n:]

    def _truncate(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """Truncate one sequence; returns the kept (prompt part, completion part)."""
        keep_end = self.truncation_mode == "keep_end"
        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            mpl = self.max_prompt_length
            prompt = prompt[len(prompt) - mpl :] if keep_end else prompt[:mpl]
        if self.max_completion_length is not None:
            completion = completion[: self.max_completion_length]
        ml = self.max_length
        if ml is not None and len(prompt) + len(completion) > ml:
            if keep_end:
                cut = len(prompt) + len(completion) - ml  # tokens removed from the front
                if cut >= len(prompt):
                    completion = completion[cut - len(prompt) :]
                    prompt = []
                else:
                    prompt = prompt[cut:]
            else:
                prompt = prompt[:ml]
                completion = completion[: ml - len(prompt)]
        return prompt, completion

    # ------------------------------------------------------------------ collation
    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``rows`` (see the class docstring for the output)."""
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
        if len(rows) == 0:
            raise ValueError("rows is empty: a batch needs at least one preference pair")
        P = len(rows)
        seqs: list[_Pair] = []
        for i, row in enumerate(rows):
            prompt, chosen, rejected = self.tokenize_row(row, i)
            seqs.append([self._truncate(prompt, chosen), self._truncate(prompt, rejected)])
        if self.packing == "prefix_shared":
            seqs = self._shared_prompts(seqs)
        units = self._units(seqs)
        rows_of_units, L = self._rows_of_units(units)
        tokens, run_start = self._place(units, rows_of_units, L)
        scored, lengths = self._scored_tokens(seqs, run_start, tokens["input_ids"])
        batch: dict[str, Any] = {
            "input_ids": tokens["input_ids"],
            "position_ids": tokens["position_ids"],
            "attention_mask": (tokens["token_seq"] >= 0).long(),
            "token_seq": tokens["token_seq"],
            "token_role": tokens["token_role"],
            "token_pair": tokens["token_pair"],
            **scored,
            "chosen_lengths": lengths[:P].clone(),
            "rejected_lengths": lengths[P:].clone(),
            "num_pairs": P,
            "packing": self.packing,
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if all(key in row for row in rows):
                batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float32)
        return batch

    def _shared_prompts(self, seqs: list[_Pair]) -> list[_Pair]:
        """ "prefix_shared": the pairs with one prompt for both sequences -- the shorter of the two truncated prompts
        where truncation cut them differently (a one-time warning)."""
        out: list[_Pair] = []
        for (pc, cc), (pr, cr) in seqs:
            if pc != pr:
                shared = pc if len(pc) < len(pr) else pr
                if not self._warned_prompt_cut:
                    warnings.warn(
                        "prefix_shared: truncation cut the prompt differently for chosen and rejected; the pair "
                        "keeps the shorter prompt suffix for both (packing='pad' keeps TRL's per-sequence cut)",
                        UserWarning,
                        stacklevel=3,  # the caller of __call__
                    )
                    self._warned_prompt_cut = True
                pc = pr = shared
            out.append([(pc, cc), (pr, cr)])
        return out

    def _units(self, seqs: list[_Pair]) -> list[list[_Run]]:
        """The units placed on rows, each a list of token runs ``(tokens, seq_id, role, pair, first_position)``:
        one ``[prompt, chosen, rejected]`` unit per pair under "prefix_shared" (both completions continue the
        prompt's positions), else one ``[prompt, completion]`` unit per sequence ``s = k * P + i``."""
        P = len(seqs)
        if self.packing == "prefix_shared":
            return [
                [(pc, i, ROLE_PROMPT, i, 0), (cc, i, ROLE_CHOSEN, i, len(pc)), (cr, P + i, ROLE_REJECTED, i, len(pc))]
                for i, ((pc, cc), (_, cr)) in enumerate(seqs)
            ]
        units: list[list[_Run]] = []
        for s in range(2 * P):
            i, k = s % P, s // P
            p, c = seqs[i][k]
            units.append([(p, s, ROLE_PROMPT, i, 0), (c, s, ROLE_CHOSEN + k, i, len(p))])
        return units

    def _rows_of_units(self, units: list[list[_Run]]) -> tuple[list[list[int]], int]:
        """``(unit indices of each row, column count L)``: a row per unit under "pad", else units filled into rows
        of at most ``max_tokens_per_row`` tokens (one row without a cap); ``L`` is the longest row (at least 1),
        rounded up to ``pad_to_multiple_of``."""
        sizes = [sum(len(run[0]) for run in u) for u in units]
        if self.packing == "pad":
            rows_of_units = [[j] for j in range(len(units))]
        elif self.max_tokens_per_row is None:
            rows_of_units = [list(range(len(units)))]
        else:
            rows_of_units, current, used = [], [], 0
            for j, n in enumerate(sizes):
                if current and used + n > self.max_tokens_per_row:
                    rows_of_units.append(current)
                    current, used = [], 0
                current.append(j)
                used += n
            rows_of_units.append(current)
        L = max(1, max(sum(sizes[j] for j in r) for r in rows_of_units))
        if self.pad_to_multiple_of is not None:
            L = int(math.ceil(L / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return rows_of_units, L

    def _place(
        self, units: list[list[_Run]], rows_of_units: list[list[int]], L: int
    ) -> tuple[dict[str, torch.Tensor], dict[tuple[int, int], int]]:
        """The ``[R, L]`` int64 ``input_ids``, ``position_ids``, ``token_seq``, ``token_role``, ``token_pair`` of the
        placed units (-1 / the pad id on padding), and the flat start ``r * L + col`` of every run by
        ``(seq_id, role)``, to locate every sequence's tokens."""
        R = len(rows_of_units)
        input_ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        position_ids = torch.empty((R, L), dtype=torch.long)
        token_seq = torch.full((R, L), -1, dtype=torch.long)
        token_role = torch.full((R, L), -1, dtype=torch.long)
        token_pair = torch.full((R, L), -1, dtype=torch.long)
        run_start: dict[tuple[int, int], int] = {}
        for r, unit_ids in enumerate(rows_of_units):
            col = 0
            for j in unit_ids:
                for tokens, s, role, pair, pos0 in units[j]:
                    n = len(tokens)
                    run_start[(s, role)] = r * L + col
                    if n:
                        input_ids[r, col : col + n] = torch.tensor(tokens, dtype=torch.long)
                        position_ids[r, col : col + n] = torch.arange(pos0, pos0 + n)
                        token_seq[r, col : col + n] = s
                        token_role[r, col : col + n] = role
                        token_pair[r, col : col + n] = pair
                    col += n
            # padding tail: positions keep counting in "pad" (HF's default arange), restart at 0 when packed
            if col < L:
                start = col if self.packing == "pad" else 0
                position_ids[r, col:] = torch.arange(start, start + L - col)
        placed = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "token_seq": token_seq,
            "token_role": token_role,
            "token_pair": token_pair,
        }
        return placed, run_start

    def _scored_tokens(
        self, seqs: list[_Pair], run_start: dict[tuple[int, int], int], input_ids: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The scored completion tokens, ordered by (sequence, position): ``logp_index`` (flat location of the
        predicting hidden state), ``logp_labels``, ``logp_seq``, ``logp_pos`` int64 ``[M]``; and the int64 ``[2P]``
        count of each sequence's scored tokens."""
        P = len(seqs)
        idx_parts: list[torch.Tensor] = []
        lab_parts: list[torch.Tensor] = []
        lengths = torch.zeros(2 * P, dtype=torch.long)
        flat_ids = input_ids.view(-1)
        for s in range(2 * P):
            i, k = s % P, s // P
            p, c = seqs[i][k]
            if not c:
                continue
            prompt_seq = i if self.packing == "prefix_shared" else s
            c_start = run_start[(s, ROLE_CHOSEN + k)]
            comp_loc = torch.arange(c_start, c_start + len(c))
            if p:
                p_start = run_start[(prompt_seq, ROLE_PROMPT)]
                pred = torch.cat([torch.tensor([p_start + len(p) - 1]), comp_loc[:-1]])
            else:  # the first completion token has nothing before it: not scored (TRL's completion_mask[:, 1:])
                pred, comp_loc = comp_loc[:-1], comp_loc[1:]
            if comp_loc.numel() == 0:
                continue
            idx_parts.append(pred)
            lab_parts.append(flat_ids[comp_loc])
            lengths[s] = comp_loc.numel()
        if idx_parts:
            logp_index = torch.cat(idx_parts)
            logp_labels = torch.cat(lab_parts)
            logp_seq = torch.repeat_interleave(torch.arange(2 * P), lengths)
            starts = torch.cumsum(lengths, 0) - lengths  # first entry of each sequence
            logp_pos = torch.arange(logp_seq.numel()) - starts[logp_seq]
        else:
            logp_index = logp_labels = logp_seq = logp_pos = torch.zeros(0, dtype=torch.long)
        scored = {"logp_index": logp_index, "logp_labels": logp_labels, "logp_seq": logp_seq, "logp_pos": logp_pos}
        return scored, lengths
