"""``fastdpo train`` on damaged files, crashes and numeric failure (issue 13, items 3, 6, 7, 8).

- Checkpoints are checksummed and kept in two generations: a corrupt (one flipped byte), truncated, empty or missing
  newest checkpoint makes ``--resume`` fall back to the previous one with a warning, and the run ends exactly as an
  uninterrupted one; with no usable checkpoint, ``--resume`` is a one-line error.
- A partial last line of ``metrics.jsonl`` does not block ``--resume``.
- ``kill -9`` at random moments (``--save-every 1``) leaves no temporary files after the next start, and the run
  resumed to the end is consistent.
- An output folder holding a run is refused without ``--resume`` / ``--overwrite``.
- ``--dtype float16`` trains (mixed precision, loss scaling) instead of turning NaN; a non-finite loss stops the run
  (exit 1) without writing a model; ``--on-nonfinite skip`` skips such steps.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import metrics_records

from fastdpo.atomic import CorruptFileError
from fastdpo.run_state import load_checkpoint, save_checkpoint
from fastdpo.train import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden-size", "32", "--layers", "1", "--batch-size", "4", "--eval-batch-size", "8", "--eval-batches", "1",
        "--eval-every", "0", "--log-every", "0", "--no-progress", "--seed", "4"]  # fmt: skip


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in metrics_records(out) if "loss" in r and "eval_loss" not in r]


def _tmp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_checkpoint_checksum_catches_one_flipped_byte(tmp_path: Path) -> None:
    """One flipped byte inside a tensor of a checkpoint: torch.load still reads it, load_checkpoint refuses it
    naming the file (before, --resume trained on from the damaged weights)."""
    path = tmp_path / "checkpoint.pt"
    w = torch.randn(64, 16)
    state = {
        "model": {"w": w},
        "optimizer": {},
        "scheduler": {},
        "data_order": {},
        "step": 3,
        "rng": {},
        "args": {"steps": 5},
    }
    save_checkpoint(path, state)
    assert torch.equal(load_checkpoint(path)["model"]["w"], w)
    data = bytearray(path.read_bytes())
    at = data.find(w.numpy().tobytes())
    assert at >= 0
    data[at + 1001] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=False)["model"]["w"], w)  # unpickles: silent without a sum
    with pytest.raises(CorruptFileError, match=re.escape(str(path)) + ".*corrupt.*checksum"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run: what every damaged-and-resumed run must end as."""
    out = tmp_path_factory.mktemp("full") / "run"
    torch.set_num_threads(1)
    assert main(["--output-dir", str(out), "--steps", "6", "--save-every", "1", *TINY]) == 0
    return out


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped byte":
        state = torch.load(path, weights_only=False)
        needle = state["model"]["model.embed_tokens.weight"].numpy().tobytes()
        at = data.find(needle)
        assert at >= 0
        data = data[: at + 100] + bytes([data[at + 100] ^ 0x10]) + data[at + 101 :]
        path.write_bytes(data)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "empty", "missing"])
def test_resume_falls_back_to_previous_checkpoint(
    full_run: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--steps", "6", "--save-every", "1", *TINY]
    assert main([*common, "--stop-after", "4"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 3
    _damage(out / "checkpoint.pt", how)
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "checkpoint.prev.pt (step 3)" in err and str(out / "checkpoint.pt") in err
    assert "Traceback" not in err
    # the run continued from step 3 and ended exactly as the uninterrupted one
    assert _train_steps(out) == list(range(1, 7))
    final = _weights(out / "checkpoint.pt")
    for name, value in _weights(full_run / "checkpoint.pt").items():
        assert torch.equal(final[name], value), name
    assert metrics_records(out) == metrics_records(full_run)
    assert _tmp_files(out) == []


def test_resume_without_any_usable_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--steps", "6", "--save-every", "1", *TINY]
    assert main([*common, "--stop-after", "2"]) == 0
    (out / "checkpoint.pt").write_bytes(b"")
    (out / "checkpoint.prev.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no usable checkpoint" in lines[0] and "checkpoint.prev.pt" in lines[0], lines


def test_partial_metrics_line_does_not_block_resume(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--steps", "6", "--save-every", "1", *TINY]
    assert main([*common, "--stop-after", "3"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0.008, "loss": 0.69')  # a crash mid-write: no newline, not JSON
    assert main([*common, "--resume"]) == 0
    assert metrics_records(out) == metrics_records(full_run)


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--save-every", "1", *TINY]
    assert main([*common, "--steps", "3"]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*common, "--steps", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--output-dir" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing was touched
    assert main([*common, "--steps", "2", "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    # --overwrite starts over: the earlier run's files are gone, the new run's log starts at step 0
    assert main([*common, "--steps", "2", "--overwrite"]) == 0
    assert _train_steps(out) == [1, 2]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 1  # of the new run, not the old step-2 one
    # a folder with unrelated files only is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert main(["--output-dir", str(other), "--save-every", "0", "--steps", "1", *TINY]) == 0


def test_kill9_at_random_times_then_resume(tmp_path: Path) -> None:
    """``fastdpo train --save-every 1`` SIGKILLed at random moments (seeded), restarted each time (--resume when a
    checkpoint exists, else --overwrite): every start removes the dead writers' temporary files, no temporary file
    survives the final run, and the resumed run is consistent (each step logged once, checkpoints verify, finite
    model)."""
    out = tmp_path / "run"
    steps = 40
    base = [
        sys.executable,
        "-m",
        "fastdpo.cli",
        "train",
        "--output-dir",
        str(out),
        "--steps",
        str(steps),
        "--save-every",
        "1",
        *TINY,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        resume = (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists()
        extra = ["--resume"] if resume else (["--overwrite"] if out.exists() else [])
        proc = subprocess.Popen(
            base + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path)
        )
        assert proc.stdout is not None
        started = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the trainer is set up once it prints its first line
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(("fastdpo train:", "step 0")):
                started = True
                break
        if not started or proc.poll() is not None:
            rest = proc.stdout.read()
            proc.wait()
            assert proc.returncode == 0, rest[-2000:]
            break
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            proc.stdout.read()
            proc.wait()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kills += 1
    assert kills >= 2, "the runs finished before they could be killed"
    resume = (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists()
    result = subprocess.run(
        base + (["--resume"] if resume else ["--overwrite"]),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tmp_files(out) == []
    assert _train_steps(out) == list(range(1, steps + 1))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == steps
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == steps - 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_trains_with_loss_scaling(tmp_path: Path) -> None:
    """--dtype float16 (before: loss NaN from step 2, exit 0, every saved tensor NaN): every loss finite, the policy
    learns on the held-out set, and the saved model is finite."""
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--dtype", "float16", "--steps", "12", "--save-every", "0", *TINY]) == 0
    steps = [r for r in metrics_records(out) if "loss" in r and "eval_loss" not in r]
    assert len(steps) == 12 and all(r["loss"] == r["loss"] and abs(r["loss"]) < 10 for r in steps)
    assert all("loss_scale" in r for r in steps)
    evals = [r for r in metrics_records(out) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it moved the right way (0.6931 at step 0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_stops_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A learning rate of 1e30 blows the weights up after one step: the run stops with exit code 1 and one line,
    no optimizer step with the non-finite gradient, no model/, and every checkpoint on disk is finite."""
    out = tmp_path / "run"
    common = [
        "--output-dir",
        str(out),
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--steps",
        "6",
        "--save-every",
        "1",
        *TINY,
    ]
    capsys.readouterr()
    assert main(common) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "--on-nonfinite skip" in err[0], err
    assert not (out / "model").exists()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if (out / name).exists():
            assert all(torch.isfinite(v).all() for v in load_checkpoint(out / name)["model"].values())
    # skipping instead: the run ends, the bad steps are marked, the model is finite
    skip = tmp_path / "skip"
    assert main([*common[:1], str(skip), *common[2:], "--on-nonfinite", "skip"]) == 0
    records = [r for r in metrics_records(skip) if "loss" in r and "eval_loss" not in r]
    assert any(r.get("skipped") for r in records)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(skip / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
