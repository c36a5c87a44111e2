"""Launching the multi-process tests: one place for starting ranks, waiting, killing on timeout and reading results.

Every distributed test runs a worker script (``tests/*_worker.py``) in several processes, either through a launcher
(``torchrun``, ``accelerate launch``: :func:`run_launcher`) or as one process per rank with a file rendezvous
(:func:`run_ranks`, :func:`init_file_group`). Each rank writes ``rank{r}.pt`` (a ``torch.save``-d result dict) under
the output folder (:func:`saving_results`), with each job's outcome or error (:func:`outcome`); a failure or a timeout
fails the test with the tail of the ranks' output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

#: skips a test where torch.distributed has no gloo backend (the CPU multi-process tests need it)
needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
#: the marks of a multi-process test module (``pytestmark = MULTI_PROCESS``)
MULTI_PROCESS = [pytest.mark.distributed, needs_gloo]

#: the environment every launch gets: one thread per rank (the CI machine has 2 cores), unbuffered output
_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line ``torchrun --standalone --nproc_per_node=nproc *args`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def load_worker(path: Path, name: str) -> ModuleType:
    """Import a worker script by path (its helpers build the single-process references in the test process)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def init_file_group(init_file: str, rank: int, world: int) -> None:
    """Join the gloo process group of ``world`` ranks started by :func:`run_ranks` (rendezvous through
    ``init_file``); a rank that fails mid-collective makes its peers fail after 90 s instead of hanging."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(init_file)}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )


def outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": "Type: message", "traceback": ...}`` when it raises: a worker records every job's
    outcome so that one failing job does not hide the others."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


@contextlib.contextmanager
def saving_results(results: dict[str, Any], out_dir: str | Path, rank: int) -> Iterator[None]:
    """On leaving the block (an exception included) save ``results`` as ``out_dir/rank{rank}.pt``, the file the
    launching test reads, and destroy the process group."""
    try:
        yield
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()


def _results(out_dir: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_launcher(
    cmd: list[str], out_dir: Path, world: int, timeout_s: float, what: str = "run"
) -> list[dict[str, Any]]:
    """Run ``cmd`` (a launcher starting ``world`` ranks) in its own session; on timeout kill the launcher and every
    rank it started. Returns the ranks' result dicts in rank order."""
    env = dict(os.environ, **_ENV)
    with open(out_dir / "launch.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started (own session)
            proc.wait()
            code = None
        log.seek(0)
        output = log.read()[-8000:]
    assert code is not None, f"the {world}-rank {what} did not finish within {timeout_s}s:\n{output}"
    assert code == 0, f"the {world}-rank {what} failed (exit code {code}):\n{output}"
    return _results(out_dir, world)


def run_ranks(cmds: list[list[str]], out_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Start ``cmds[r]`` as rank ``r`` (each its own process, e.g. with a file rendezvous), wait for all, kill the
    others when one hangs. Returns the ranks' result dicts in rank order."""
    env = dict(os.environ, **_ENV)
    procs, logs = [], []
    for rank, cmd in enumerate(cmds):
        log = open(out_dir / f"rank{rank}.log", "w+")  # closed below, after the ranks end
        logs.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes: list[int] | None = [p.wait(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    output = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        output += f"\n--- rank {rank} ---\n" + log.read()[-6000:]
        log.close()
    assert codes is not None, f"ranks did not finish within {timeout_s}s:{output}"
    assert codes == [0] * len(cmds), f"rank exit codes {codes}:{output}"
    return _results(out_dir, len(cmds))
