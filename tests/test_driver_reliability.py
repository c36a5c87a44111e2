"""``fastdpo bench`` keeps what it measured (issue 13, item 9): without matplotlib it warns at start and writes its
JSON/CSV (before, it imported matplotlib only after the whole run, crashed, and lost every result), and the JSON/CSV
are rewritten atomically as results arrive, so a run killed half-way keeps its finished cases."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdpo.benchmarks import driver

QUICK = ["--quick", "--device", "cpu", "--workloads", "logprobs", "--impls", "naive", "--threads", "1"]


def test_without_matplotlib_results_are_written_and_plots_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert driver.main([*QUICK, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    warning = err.find("warning: matplotlib is not usable")
    assert warning >= 0, err
    progress = err.find("fastdpo bench:", warning + 1)  # tqdm's bar comes after the warning: it was given at start
    assert progress > warning
    (json_path,) = tmp_path.glob("quick-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert data["meta"]["complete"] is True and data["meta"]["plots"] == []
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["impl"] == "naive" for r in ok)
    (csv_path,) = tmp_path.glob("quick-cpu-*.csv")
    assert len(list(csv.DictReader(csv_path.open()))) == 2
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp"))


def test_killed_run_keeps_finished_cases(tmp_path: Path) -> None:
    """SIGKILL once the first worker's results are in: the JSON and CSV on disk parse, say the run is incomplete,
    and hold those results."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "fastdpo.cli",
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--workloads",
        "logprobs,head",
        "--impls",
        "naive,fastdpo",
        "--no-plots",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(tmp_path),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    found: dict | None = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(out.glob("quick-cpu-*.json")) if out.exists() else []
            if files:
                data = json.loads(files[0].read_text())  # written atomically: always whole
                if any(r.get("status") == "ok" for r in data["results"]):
                    found = data
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert found is not None, "no result was written while the run was going"
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (json_path,) = out.glob("quick-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert data["meta"]["complete"] is False
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert ok and all(r["step_ms"] > 0 for r in ok)
    (csv_path,) = out.glob("quick-cpu-*.csv")  # written before the JSON each time: it holds at least the JSON's cases
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) >= len(data["results"])
    assert [(r["workload"], r["impl"], r["status"]) for r in rows[: len(data["results"])]] == [
        (r["workload"], r["impl"], r["status"]) for r in data["results"]
    ]
