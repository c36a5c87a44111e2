"""How one case of the one-shot GPU run is measured and guarded (``benchmarks/gpu_run.sh``).

* :func:`time_passes` — forward (+ backward) timing: warm-up calls first (Triton compilation and autotuning, cuBLAS
  handles, lazy imports stay out of the numbers), then ``repeats`` timed calls bracketed by CUDA events (on CPU, for
  ``--dry-run``, ``perf_counter``); medians. The peak memory statistics are reset right before the timed calls, so the
  reported peak (``torch.cuda.max_memory_allocated``) is that of the timed passes alone.
* :func:`time_op` — median time of a plain op (the copy and ``torch.mm`` ceilings measured beside each case).
* :class:`Context` — the run's global time guard and the OOM-safe case runner: a case whose estimated duration would
  end past the deadline is recorded as skipped instead of run; an out-of-memory error or any other exception is
  recorded and the run goes on; memory is freed after every case; every record goes to the report at once.
* :data:`H100` — the rates the time estimates are written in (one H100 SXM; an H200 is faster on bytes).
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from fastdpo.benchmarks.measure import Timer

MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class Rates:
    """Throughputs the per-case time estimates use."""

    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflops: float  # dense bf16 GEMM
    fp64_tflops: float  # dense fp64 GEMM on the device (float64 references that need every row)
    cpu_fp64_gflops: float  # float64 GEMM on the host (the reference slices)
    cpu_gbps: float  # host memory passes over float64 slices, device -> host copies


# H100 SXM: HBM3 copy ~3.0 TB/s and the bf16 GEMM ceiling ~790 TFLOP/s measured (DESIGN.md); fp64 tensor-core GEMM
# ~50 TFLOP/s (67 peak); a 16-core host at ~100 GFLOP/s float64 and ~5 GB/s for pageable copies and fp64 passes.
H100 = Rates(copy_gbps=3000.0, bf16_tflops=790.0, fp64_tflops=50.0, cpu_fp64_gflops=100.0, cpu_gbps=5.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors and return cached blocks to the driver (between cases)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Passes:
    """Medians over the timed repeats, in milliseconds, and the device memory of those repeats (``None`` on CPU)."""

    fwd_ms: float
    bwd_ms: float | None
    step_ms: float
    repeats: int
    peak_mb: float | None  # max_memory_allocated during the timed repeats (everything resident included)
    extra_mb: float | None  # that peak minus what was allocated before them (the case's working memory)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def time_passes(
    fwd: Callable[[], Any],
    bwd: Callable[[Any], Any] | None,
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    before: Callable[[], None] | None = None,
) -> tuple[Passes, Any, Any]:
    """Time ``out = fwd()`` and ``res = bwd(out)``; returns ``(passes, out, res)`` of the last timed repeat.

    ``before()`` runs untimed ahead of every call (e.g. ``zero_grad``). Each repeat's outputs are dropped before the
    next one starts, so at most one repeat's tensors are alive.
    """
    timer = Timer(device)
    for _ in range(warmup):
        if before is not None:
            before()
        out = fwd()
        res = bwd(out) if bwd is not None else None
        del out, res
    synchronize(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fwd_t: list[float] = []
    bwd_t: list[float] = []
    out = res = None
    for _ in range(max(1, repeats)):
        out = res = None
        if before is not None:
            before()
        t0 = timer.mark()
        out = fwd()
        t1 = timer.mark()
        res = bwd(out) if bwd is not None else None
        t2 = timer.mark()
        fwd_t.append(timer.elapsed(t0, t1))
        bwd_t.append(timer.elapsed(t1, t2))
    peak = extra = None
    if device.type == "cuda":
        synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device)
        peak, extra = peak_bytes / MB, (peak_bytes - base) / MB
    steps = [f + b for f, b in zip(fwd_t, bwd_t, strict=True)]
    passes = Passes(
        fwd_ms=1e3 * statistics.median(fwd_t),
        bwd_ms=1e3 * statistics.median(bwd_t) if bwd is not None else None,
        step_ms=1e3 * statistics.median(steps),
        repeats=len(steps),
        peak_mb=peak,
        extra_mb=extra,
    )
    return passes, out, res


def time_op(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (its result is dropped) after ``warmup`` untimed calls."""
    passes, _, _ = time_passes(fn, None, device=device, warmup=warmup, repeats=repeats)
    return passes.fwd_ms


class Sink(Protocol):
    def add(self, record: dict[str, Any]) -> None: ...


@dataclass
class Context:
    """What every section needs: the device, the repeat counts, the report, the peers and the global time guard."""

    device: torch.device
    dry_run: bool
    warmup: int
    repeats: int
    deadline: float  # epoch seconds: no case may be started that is estimated to end later
    sink: Sink
    peers: dict[str, str]  # fastdpo.benchmarks.gpu_peers.peer_status()
    log: Callable[[str], None] = print

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def skip(self, base: dict[str, Any], reason: str) -> None:
        """Record a case that cannot run here (``reason`` starts with ``"skipped: "``)."""
        rec = {**base, "status": reason}
        self.sink.add(rec)
        self.log(_one_line(rec))

    def run_case(self, base: dict[str, Any], estimate_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one case (``fn`` returns the measured fields) unless the time guard says it would not finish; record
        the outcome (``status`` ok / skipped / oom / error) in the report at once and free the memory it used."""
        left = self.seconds_left()
        rec = dict(base)
        if estimate_s > left:
            rec["status"] = f"skipped: time budget (estimated {estimate_s:.0f} s, {max(left, 0):.0f} s left)"
        else:
            t0 = time.time()
            try:
                rec.update(fn())
                rec.setdefault("status", "ok")
            except torch.OutOfMemoryError as exc:
                rec["status"] = "oom"
                rec["error"] = str(exc).splitlines()[0][:300]
            except Exception as exc:  # one failing case must not lose the others: record it and go on
                rec["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                rec["traceback"] = traceback.format_exc(limit=6).strip().splitlines()[-8:]
            rec["wall_s"] = round(time.time() - t0, 2)
            rec["estimate_s"] = round(estimate_s, 1)
            free_memory(self.device)
        self.sink.add(rec)
        self.log(_one_line(rec))
        return rec


def _one_line(rec: dict[str, Any]) -> str:
    keys = ("section", "attn", "impl", "dtype", "N", "D", "V")
    head = " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k) is not None)
    if rec.get("status") != "ok":
        return f"[{head}] {rec.get('status')}"
    parts = [
        f"{k}={rec[k]:.4g}"
        for k in ("step_ms", "fwd_gbps", "bwd_gbps", "tflops", "tokens_per_s", "peak_mb")
        if isinstance(rec.get(k), (int, float))
    ]
    return f"[{head}] ok {' '.join(parts)} check={rec.get('check', 'n/a')} ({rec.get('wall_s')} s)"
