"""The two test modes (``tests/gpu_mode.py``): ``pytest -m gpu`` runs the gpu tests with compiled kernels (interpreter
off) and skips them without CUDA; the plain suite interprets Triton on CPU tensors and leaves gpu tests to that mode.

The command-line runs are real ``python -m pytest`` subprocesses with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), so
they check the same thing on CPU and GPU machines: which ``TRITON_INTERPRET`` the run set, what ``@triton.jit`` made of
fastdpo's kernels (``JITFunction`` = compiled, ``InterpretedFunction`` = interpreter), and why each gpu test skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_mode
import pytest

ROOT = Path(__file__).resolve().parent.parent
# files with gpu-marked tests and cheap imports
GPU_FILES = ["tests/test_large_index.py", "tests/test_segments.py"]


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("gpu", True),
        ("gpu and not distributed", True),
        ("(gpu)", True),
        ("not (not gpu)", True),
        ("gpu and distributed", True),
        ("", False),
        (None, False),
        ("not gpu", False),
        ("gpu or distributed", False),
        ("distributed", False),
        ("gpu and not gpu", False),
        ("not distributed", False),
    ],
)
def test_mode_selection(expr: str | None, expected: bool) -> None:
    assert gpu_mode.selects_only_gpu(expr) is expected
    assert gpu_mode.triton_interpret_value(expected) == ("0" if expected else "1")


def _pytest(*args: str) -> tuple[int, str]:
    """``(exit code, stdout)`` of a fresh ``python -m pytest`` (none of this run's pytest / xdist variables)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST") and not k.startswith("PYTEST_XDIST")
    }
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-rs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout


def _header(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("fastdpo test mode:")]
    return line


def _skip_reasons(out: str) -> list[str]:
    return re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", out, flags=re.M)


MODE_RUNS = {
    "gpu_mode_without_cuda_skips_every_gpu_test_compiled": (
        ("-m", "gpu", *GPU_FILES),
        "fastdpo test mode: gpu (-m gpu); TRITON_INTERPRET=0; kernels: JITFunction; CUDA available: False",
        gpu_mode.SKIP_NO_CUDA,
    ),
    "plain_mode_interprets_and_leaves_gpu_tests_to_the_gpu_mode": (
        (*GPU_FILES, "-k", "cuda"),  # only the gpu tests match
        "fastdpo test mode: plain; TRITON_INTERPRET=1; kernels: InterpretedFunction; CUDA available: False",
        gpu_mode.SKIP_NOT_GPU_MODE,
    ),
}


@pytest.mark.parametrize("run", list(MODE_RUNS))
def test_mode_run(run: str) -> None:
    """A real run in each mode: its header line, every gpu test skipped for the mode's reason, nothing else run."""
    args, header, reason = MODE_RUNS[run]
    rc, out = _pytest(*args)
    assert rc == 0, out
    assert _header(out) == header, out
    reasons = _skip_reasons(out)
    assert reasons and set(reasons) == {reason}, out
    (summary,) = re.findall(r"^=+ (.*) in [\d.]+s.* =+$", out, flags=re.M)
    assert re.fullmatch(r"\d+ skipped, \d+ deselected", summary), summary  # nothing passed, failed or errored
