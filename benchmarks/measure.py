"""Measurement primitives and the per-implementation worker process.

Timing: median over repeats of wall time (``time.perf_counter``) on CPU, CUDA events on GPU.

Memory: on GPU the caching allocator's statistics (``max_memory_allocated`` after ``reset_peak_memory_stats``). On CPU
the process's peak resident set: after setup and warm-up the kernel's high-water mark is reset by writing ``"5"`` to
``/proc/self/clear_refs``; ``VmHWM`` from ``/proc/self/status`` is then read after forward and after backward. Every
implementation runs in its own worker process (``python -m fastdpo.benchmarks.measure SPEC OUT``) started with a fixed
glibc mmap threshold, so a freed tensor leaves the resident set at once and one implementation's heap never hides
another's peak. Reported memory is the *extra* peak over the setup (inputs, weights, upstream gradient); it includes
the gradient buffers that backward allocates for the inputs (``.grad`` of hidden/weight or logits), whose size is
reported separately as ``grad_mb``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

# glibc: serve every allocation above 64 KiB with mmap and never adapt the threshold, so freeing returns memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MB = 1024.0 * 1024.0


def start_ranks(
    module: str, rank_args: Callable[[int], list[str]], world: int, env: dict[str, str]
) -> list[subprocess.Popen[str]]:
    """Start ``python -m module *rank_args(r)`` for each rank ``r < world`` (stdout and stderr captured together, as
    text); the processes in rank order."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", module, *rank_args(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


def proc_status_kb(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux): ``"VmRSS"`` (resident set now), ``"VmHWM"`` (its
    high-water mark since the process started or since :func:`reset_peak_rss`)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current resident set (Linux)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class PeakMemory:
    """Peak-memory probe for ``device``: :meth:`reset` marks the baseline, :meth:`extra` is the peak above it
    (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM, clear_refs reset)"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return proc_status_kb("VmRSS") * 1024

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        self.base = self.current()

    def extra(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return proc_status_kb("VmHWM") * 1024 - self.base


class Timer:
    """Seconds between :meth:`start` and :meth:`stop` (CUDA events on GPU, ``perf_counter`` elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured roofline ceilings on ``device``: copy bandwidth (GB/s, read+write of a 1 GiB buffer on GPU) and
    matmul throughput (TFLOP/s of an 8192³ GEMM in ``dtype`` on GPU; 1024³ on CPU). Median of 5 runs after warm-up."""
    timer = Timer(device)
    big = device.type == "cuda"
    n_bytes = (1 << 30) if big else (1 << 27)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    m = 8192 if big else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = timer.mark()
            fn()
            times.append(timer.elapsed(t0, timer.mark()))
        return statistics.median(times)

    t_copy = best(lambda: dst.copy_(src))
    t_mm = best(lambda: a @ b)
    return {"copy_gbps": 2 * n_bytes / t_copy / 1e9, "matmul_tflops": 2 * m**3 / t_mm / 1e12}


def _clear_grads(tensors: tuple[torch.Tensor, ...]) -> None:
    for t in tensors:
        t.grad = None


def run_case(
    impl_name: str,
    workload: str,
    shape: Any,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    time_budget: float,
    warmup: bool,
) -> dict[str, Any]:
    """Measure one (implementation, shape): forward, backward and step times (medians over up to ``repeats`` repeats,
    fewer once ``time_budget`` seconds are spent) and extra peak memory over setup after forward and after backward."""
    from fastdpo.benchmarks.impls import Shape, get_impl, make_problem

    impl = get_impl(workload, impl_name)
    if warmup:  # first use of this implementation in the process: imports, lazy init, kernel compilation
        if device.type == "cuda":
            tiny = shape
        else:
            tiny = Shape(min(shape.tokens, 64), min(shape.hidden, 64), min(shape.vocab, 1024))
        p = make_problem(workload, tiny, dtype, device, seed=1)
        out = impl.build(p, device)()
        out.backward(p.upstream) if p.upstream is not None else out.backward()
        del out, p
    problem = make_problem(workload, shape, dtype, device)
    fn = impl.build(problem, device)
    timer = Timer(device)
    mem = PeakMemory(device)
    mem.reset()
    fwd_t, bwd_t, fwd_peak, step_peak = [], [], 0, 0
    spent = 0.0
    for _ in range(max(1, repeats)):
        _clear_grads(problem.leaves)
        t0 = timer.mark()
        out = fn()
        t1 = timer.mark()
        fwd_t.append(timer.elapsed(t0, t1))
        fwd_peak = max(fwd_peak, mem.extra())
        t1 = timer.mark()
        out.backward(problem.upstream) if problem.upstream is not None else out.backward()
        t2 = timer.mark()
        bwd_t.append(timer.elapsed(t1, t2))
        step_peak = max(step_peak, mem.extra())
        del out
        spent += fwd_t[-1] + bwd_t[-1]
        if spent + fwd_t[-1] + bwd_t[-1] > time_budget:
            break
    steps = [f + b for f, b in zip(fwd_t, bwd_t)]
    return {
        "status": "ok",
        "impl_label": impl.label(device),
        "repeats": len(steps),
        "fwd_ms": 1e3 * statistics.median(fwd_t),
        "bwd_ms": 1e3 * statistics.median(bwd_t),
        "step_ms": 1e3 * statistics.median(steps),
        "fwd_peak_mb": fwd_peak / MB,
        "step_peak_mb": step_peak / MB,
        "setup_mb": mem.base / MB,
        "grad_mb": problem.grad_bytes() / MB,
        "grads_included": True,
        "memory_method": mem.method,
    }


def _work_units(workload: str, shape: Any) -> float:
    return float(shape.tokens) * shape.vocab * (1 if workload == "logprobs" else shape.hidden)


def worker(spec: dict[str, Any], out_path: str) -> int:
    """Run every shape of ``spec`` (one implementation, one workload) in ascending size, appending one record per
    shape to ``out_path`` (JSON list, rewritten after each shape so a crash keeps earlier results).

    A peer's shape whose predicted step time (last measured step scaled by the work ratio) exceeds
    ``spec["max_case_seconds"]`` is recorded as skipped instead of run (naive and fastdpo, ``spec["peer"]`` false,
    always run), as is any shape that would end past ``spec["deadline"]`` (epoch seconds)."""
    from fastdpo.benchmarks.impls import Shape

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    workload = spec["workload"]
    shapes = sorted((Shape(*s) for s in spec["shapes"]), key=lambda s: _work_units(workload, s))
    records: list[dict[str, Any]] = []
    last: tuple[float, float] | None = None  # (work units, step seconds)
    warm = False
    for shape in shapes:
        base = {
            "workload": workload,
            "impl": spec["impl"],
            "tokens": shape.tokens,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
            "dtype": spec["dtype"],
            "device": spec["device"],
        }
        predicted = None if last is None else last[1] * _work_units(workload, shape) / last[0]
        deadline = spec.get("deadline")
        if predicted is not None and spec.get("peer", True) and predicted > spec["max_case_seconds"]:
            rec = {
                **base,
                "status": f"skipped: predicted {predicted:.0f} s/step > --max-case-seconds "
                f"{spec['max_case_seconds']:g}",
            }
        elif deadline is not None and time.time() + 2 * (predicted or 0.0) > deadline:
            rec = {**base, "status": "skipped: run time budget (--total-seconds) spent"}
        else:
            try:
                rec = {
                    **base,
                    **run_case(
                        spec["impl"],
                        workload,
                        shape,
                        device,
                        dtype,
                        spec["repeats"],
                        spec["time_budget"],
                        warmup=not warm,
                    ),
                }
                warm = True
                last = (_work_units(workload, shape), rec["step_ms"] / 1e3)
            except torch.OutOfMemoryError:
                rec = {**base, "status": "oom"}
            except Exception as exc:  # record and go on: one failing shape must not lose the others
                tb = traceback.format_exc(limit=3).strip().splitlines()
                rec = {**base, "status": f"error: {type(exc).__name__}: {exc}"[:300], "traceback": tb[-6:]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(rec)
        with open(out_path + ".tmp", "w") as fh:
            json.dump(records, fh)
        os.replace(out_path + ".tmp", out_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdpo.benchmarks.measure SPEC.json OUT.json`` (used by the driver)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fastdpo.benchmarks.measure SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        spec = json.load(fh)
    return worker(spec, argv[1])


def is_finite(x: Any) -> bool:
    """True for a finite float (used to filter records for tables/plots)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


if __name__ == "__main__":
    sys.exit(main())
