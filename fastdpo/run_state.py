"""A resumable ``fastdpo train`` run's state on disk: checkpoints, RNG states, the data order and the metrics log.

Under ``--output-dir``: ``checkpoint.pt`` (atomic and checksummed, :mod:`fastdpo.atomic`) with the generation before
it as ``checkpoint.prev.pt`` (a damaged newest file is moved aside to ``checkpoint.pt.corrupt`` on resume), and
``metrics.jsonl`` (one JSON record per optimizer step and evaluation; on resume, records past the checkpoint's step and
a partial last line are dropped). :class:`DataOrder` is the seeded epoch-wise shuffling that resumes mid-epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from fastdpo.atomic import CorruptFileError, atomic_write, load_checksummed, save_checksummed
from fastdpo.cli import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
LOG_NAME = "metrics.jsonl"
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CHECKPOINT_NAME + ".corrupt", LOG_NAME, "model", "reference")
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "data_order", "step", "rng", "args")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when present) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any], *, previous: Path | None = None) -> None:
    """``torch.save(state)`` atomically and checksummed (:func:`fastdpo.atomic.save_checksummed`: temporary file in
    the same folder, fsync, ``os.replace``; a crash mid-save leaves the previous checkpoint intact). With ``previous``,
    the checkpoint being replaced is kept there (two generations)."""
    save_checksummed(path, state, previous=previous)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, its checksum verified. ``FileNotFoundError`` when missing,
    :class:`fastdpo.atomic.CorruptFileError` (a ``ValueError`` naming the file) when empty, truncated, corrupt or
    without a checksum (fastdpo <= 0.1 wrote none; such a checkpoint cannot be verified and is not used)."""
    state = load_checksummed(path, what="fastdpo train checkpoint", weights_only=False)
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CorruptFileError(f"{path} is not a fastdpo train checkpoint (lacks {missing})")
    return state


class DataOrder:
    """Deterministic epoch-wise shuffling that can be saved and resumed mid-epoch.

    Epoch ``e`` visits the rows in ``torch.randperm(n, generator=seed + e)`` order, in batches of ``batch_size``
    (the last batch of an epoch may be smaller).
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self.order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Row indices of the next batch (advances the cursor, rolling over to a fresh epoch)."""
        if self.cursor >= self.num_rows:
            self.epoch += 1
            self.cursor = 0
            self.order = self._permutation(self.epoch)
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "order": list(self.order),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["num_rows"], state["batch_size"]) != (self.num_rows, self.batch_size):
            raise ValueError(
                f"checkpoint data order is for {state['num_rows']} rows in batches of {state['batch_size']}, but this "
                f"run has {self.num_rows} rows in batches of {self.batch_size}: resume with the same --data and "
                "--batch-size"
            )
        self.seed, self.epoch, self.cursor, self.order = state["seed"], state["epoch"], state["cursor"], state["order"]


class MetricsLog:
    """Append-only JSONL metrics log; on resume, records past the checkpoint's step are dropped first (atomically) so
    the log reads like an uninterrupted run, and so is a partial or undecodable line (a crash mid-write)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept: list[str] = []
        if resume_step is not None and path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if lineno != len(lines):
                        print(
                            f"fastdpo train: warning: {path} line {lineno} is not valid JSON; dropped", file=sys.stderr
                        )
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run, closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def find_checkpoint(out: Path) -> dict[str, Any]:
    """The newest usable checkpoint of ``out``: ``checkpoint.pt``, else (with a warning on stderr) the previous
    generation ``checkpoint.prev.pt``. A damaged newest file is moved aside to ``checkpoint.pt.corrupt`` so that the
    next save does not rotate it over the good previous one. ``UsageError`` when neither is usable."""
    newest, previous = out / CHECKPOINT_NAME, out / PREVIOUS_CHECKPOINT_NAME
    problems = []
    for path in (newest, previous):
        try:
            state = load_checkpoint(path)
        except FileNotFoundError:
            problems.append(f"{path} does not exist")
            continue
        except CorruptFileError as exc:
            problems.append(str(exc))
            if path == newest:
                os.replace(newest, out / (CHECKPOINT_NAME + ".corrupt"))
            continue
        if path == previous:
            print(
                f"fastdpo train: warning: {problems[0]}; resuming from the previous checkpoint {previous} "
                f"(step {state['step']})"
                + (
                    " (the damaged file is kept as checkpoint.pt.corrupt)"
                    if (out / (CHECKPOINT_NAME + ".corrupt")).exists()
                    else ""
                ),
                file=sys.stderr,
            )
        return state
    if all("does not exist" in p for p in problems):
        raise UsageError(f"--resume given but {newest} does not exist")
    raise UsageError(f"--resume: no usable checkpoint in {out}: {'; '.join(problems)}")


def load_resumable(out: Path) -> dict[str, Any]:
    """The checkpoint the main process resumed from (after it moved a damaged newest one aside), quietly."""
    for path in (out / CHECKPOINT_NAME, out / PREVIOUS_CHECKPOINT_NAME):
        try:
            return load_checkpoint(path)
        except (FileNotFoundError, CorruptFileError):
            continue
    raise UsageError(f"--resume: no usable checkpoint in {out}")


def first_eval_record(log_path: Path) -> dict[str, Any] | None:
    """The first evaluation record (``eval_rewards/accuracies``) of a metrics log, or ``None``."""
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "eval_rewards/accuracies" in entry:
                return entry
    return None


def remove_run(out: Path) -> None:
    """Delete an earlier run's files from ``out`` (``--overwrite``): checkpoints, log, model/ and reference/."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
