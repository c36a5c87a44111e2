"""Preference data: reading and validating preference files, tokenizing rows once, splitting off a held-out set.

A preference row is ``{"prompt", "chosen", "rejected"}`` (strings, or chat message lists ``[{"role", "content"}]``)
or pre-tokenized ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}`` (lists of non-negative ints).
Errors name the file and the row as it is in the file (``line N`` / ``item N`` / ``row N``). The bundled demo set is
described in ``make_demo.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fastdpo.cli import first_line

PAIR_KEYS = ("prompt", "chosen", "rejected")
TOKENIZED_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def demo_data_files() -> tuple[Path, Path]:
    """Paths of the bundled demo set: ``(train, held_out)`` JSONL files (see ``fastdpo/data/make_demo.py``)."""
    root = resources.files("fastdpo") / "data"
    return Path(str(root / "demo_train.jsonl")), Path(str(root / "demo_eval.jsonl"))


def load_preference_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read preference rows from a ``.json`` / ``.jsonl`` / ``.parquet`` file.

    Each row needs ``prompt``, ``chosen`` and ``rejected`` (strings or chat message lists), or the pre-tokenized
    ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids`` (lists of non-negative ints). A ``.json``
    file holds a list of rows (or an object with a ``"data"`` / ``"train"`` list). Other keys are dropped.
    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file and the row *as it is in the file*
    (``line N`` of a JSONL file, ``item N`` of a JSON list, ``row N`` of a Parquet table) for malformed content.
    """
    return read_preference_file(path)[0]


def read_preference_file(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`load_preference_file` plus where each row is in the file (``"<path> line 7"``), for later messages."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a preference file")
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            raw, wheres = [], []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"{path} line {lineno}: not valid JSON ({exc.msg}, column {exc.colno})"
                        ) from None
                    wheres.append(f"{path} line {lineno}")
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                try:
                    obj = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
                    ) from None
            if isinstance(obj, dict):
                obj = obj.get("data", obj.get("train"))
            if not isinstance(obj, list):
                raise ValueError(f"{path}: a .json preference file must hold a list of rows (or {{'data': [...]}})")
            raw, wheres = obj, [f"{path} item {i}" for i in range(len(obj))]
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:  # pragma: no cover - pyarrow ships with datasets
                raise ImportError("reading .parquet preference files needs pyarrow (pip install pyarrow)") from exc
            try:
                raw = pq.read_table(path).to_pylist()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise ValueError(
                    f"{path}: not a readable Parquet file ({type(exc).__name__}: {first_line(exc)})"
                ) from None
            wheres = [f"{path} row {i}" for i in range(len(raw))]
        else:
            raise ValueError(f"unsupported preference file type {suffix!r} for {path}: use .json, .jsonl or .parquet")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not raw:
        raise ValueError(f"{path} holds no preference rows")
    first = raw[0]
    keys = TOKENIZED_KEYS if isinstance(first, dict) and all(k in first for k in TOKENIZED_KEYS) else PAIR_KEYS
    cleaned = []
    for row, where in zip(raw, wheres):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with {list(keys)}, got {_json_type(row)}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{where}: lacks {missing}; every row needs {list(keys)}")
        for key in keys:
            problem = _id_list_problem(row[key]) if keys is TOKENIZED_KEYS else _text_problem(row[key])
            if problem:
                raise ValueError(f"{where}: {key!r} {problem}")
        if keys is PAIR_KEYS and len({isinstance(row[k], str) for k in keys}) != 1:
            raise ValueError(f"{where}: mixes strings and chat messages across prompt/chosen/rejected")
        cleaned.append({k: row[k] for k in keys})
    return cleaned, wheres


def _json_type(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _text_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value:
        for j, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                return f"message {j} must be an object with string 'role' and 'content'"
        return None
    return f"must be a string or a non-empty list of chat messages, got {_json_type(value)}"


def _id_list_problem(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of token ids, got {_json_type(value)}"
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            return f"must hold non-negative integer token ids, got {t!r}"
    return None


def row_texts(row: dict[str, Any]) -> Iterator[str]:
    """The texts of a row (prompt, chosen, rejected; each chat message's content), e.g. to train a tokenizer on."""
    for key in PAIR_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):  # chat messages
            for message in value:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]


def pretokenize(
    collator, rows: list[dict[str, Any]], wheres: Sequence[str] | None = None
) -> list[dict[str, list[int]]]:
    """Rows tokenized once with ``collator.tokenize_row`` (EOS/BOS/chat template applied) as pre-tokenized rows
    ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``, which the collator uses verbatim. A row the
    collator refuses (a token id outside the vocabulary, chat messages without a chat template) raises
    ``ValueError`` naming it by ``wheres[i]`` (where it is in its file) when given."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(dict(zip(TOKENIZED_KEYS, collator.tokenize_row(row, i))))
        except (ValueError, TypeError) as exc:
            if wheres is None:
                raise
            raise ValueError(f"{wheres[i]}: {str(exc).replace(f'rows[{i}]', 'the row')}") from None
    return out


def split_rows(
    rows: list[dict], wheres: list[str], fraction: float, seed: int
) -> tuple[list[dict], list[str], list[dict], list[str]]:
    """``(train rows, their wheres, held-out rows, their wheres)``: ``round(len(rows) * fraction)`` rows (at least
    one) held out by a permutation seeded from ``seed``; ``ValueError`` if that leaves no training row."""
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ValueError(f"--data has {len(rows)} rows: too few to hold out {fraction:.0%} for evaluation")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 10_007)).tolist()
    train, held = perm[n_eval:], perm[:n_eval]
    return [rows[i] for i in train], [wheres[i] for i in train], [rows[i] for i in held], [wheres[i] for i in held]
