"""fastdpo.atomic: temporary files of dead writers are removed (and only those), folders appear whole or not at all,
and the content digest is stable through torch.save / torch.load yet sees one changed bit."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdpo.atomic import (
    CorruptFileError,
    atomic_dir,
    content_digest,
    load_checksummed,
    remove_stale_tmp,
    remove_stale_tmp_in,
    save_checksummed,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_files_of_dead_writers_only(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".checkpoint.pt.{dead}.tmp").write_bytes(b"half")
    (tmp_path / f".checkpoint.pt.{alive}.tmp").write_bytes(b"in progress")
    (tmp_path / "checkpoint.pt.k3j_x9.tmp").write_bytes(b"fastdpo 0.1 mkstemp leftover")
    (tmp_path / f".other.json.{dead}.tmp").write_bytes(b"x")
    (tmp_path / f".model.{dead}.tmp").mkdir()
    (tmp_path / "notes.tmp.txt").write_text("not ours")
    removed = {p.name for p in remove_stale_tmp(target)}
    assert removed == {f".checkpoint.pt.{dead}.tmp", "checkpoint.pt.k3j_x9.tmp"}
    removed = {p.name for p in remove_stale_tmp_in(tmp_path)}
    assert removed == {f".other.json.{dead}.tmp", f".model.{dead}.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint.pt.{alive}.tmp", "notes.tmp.txt"]


def test_a_write_removes_a_dead_writers_leftover(tmp_path: Path) -> None:
    target = tmp_path / "ref.pt"
    (tmp_path / f".ref.pt.{_dead_pid()}.tmp").write_bytes(b"half")
    save_checksummed(target, {"x": torch.arange(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]


def test_atomic_dir(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        assert not target.exists()
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_content_digest_round_trip_and_sensitivity(tmp_path: Path) -> None:
    rng = np.random.RandomState(3)
    state = {
        "model": {"w": torch.randn(7, 5), "h": torch.randn(4, dtype=torch.bfloat16), "b": torch.tensor(True)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "foreach": None, "params": [0]}],
        },
        "rng": {"python": random.Random(1).getstate(), "numpy": rng.get_state(), "torch": torch.get_rng_state()},
        "args": {"steps": 4, "name": "ü", "ratio": 0.1},
    }
    path = tmp_path / "ck.pt"
    save_checksummed(path, state)
    loaded = load_checksummed(path, weights_only=False)
    assert content_digest(loaded) == content_digest(state)
    changed = dict(state, model=dict(state["model"], w=state["model"]["w"].clone()))
    changed["model"]["w"].view(torch.int32)[3, 2] ^= 1  # one bit of one float
    assert content_digest(changed) != content_digest(state)
    assert content_digest({"a": 1}) != content_digest({"a": 1.0}) != content_digest({"a": True})
    assert content_digest([1, 2]) != content_digest((1, 2))
    with pytest.raises(TypeError, match="cannot checksum"):
        content_digest({"f": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checksummed(path, {"sha256": "x"})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="unreadable"):
        load_checksummed(path)
