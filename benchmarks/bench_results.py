"""The results of ``fastdpo bench``: a record per (workload, implementation, shape), the figures derived from the
measurements, the JSON and CSV files, and the table printed at the end.

A record holds the case (``workload``, ``impl``, ``tokens``, ``hidden``, ``vocab``, ``dtype``, ``device``), its
``status`` (``"ok"``, ``"skipped: ..."`` or ``"error: ..."``) and, when ok, the measured times (ms) and extra peak
memory (MB, see :data:`MEMORY_NOTE`) written by :mod:`fastdpo.benchmarks.measure`. :func:`derive` adds achieved
TFLOP/s and GB/s of the whole step (``flops / step time``, ``min_bytes / step time``: :mod:`fastdpo.benchmarks.impls`),
their share of the measured GPU ceilings, and the ratios to the naive implementation at the same shape.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from fastdpo.atomic import atomic_write
from fastdpo.benchmarks.impls import Shape, flops, impl_names, min_bytes
from fastdpo.benchmarks.measure import is_finite

MEMORY_NOTE = (
    "memory = extra peak over setup (inputs, weights, upstream gradient already allocated); it INCLUDES the "
    "gradient buffers backward allocates for the inputs (grad_mb column: hidden.grad + weight.grad, or "
    "logits.grad)"
)


def status_record(workload: str, impl: str, shape: Shape, dtype: str, device: str, status: str) -> dict[str, Any]:
    """The record of a case that was not measured: skipped (``status`` says why) or failed (``"error: ..."``)."""
    return {
        "workload": workload,
        "impl": impl,
        "tokens": shape.tokens,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "dtype": dtype,
        "device": device,
        "status": status,
    }


def _derive_one(rec: dict[str, Any], ceilings: dict[str, float] | None) -> None:
    """Add achieved TFLOP/s and GB/s (and % of the measured ceilings on GPU) for the full step."""
    if rec.get("status") != "ok":
        return
    shape = Shape(rec["tokens"], rec["hidden"], rec["vocab"])
    elem = torch.empty((), dtype=getattr(torch, rec["dtype"])).element_size()
    step_s = rec["step_ms"] / 1e3
    rec["tflops"] = flops(rec["workload"], shape)["step"] / step_s / 1e12
    rec["gbps"] = min_bytes(rec["workload"], shape, elem)["step"] / step_s / 1e9
    if ceilings:
        rec["pct_matmul_ceiling"] = 100 * rec["tflops"] / ceilings["matmul_tflops"]
        rec["pct_copy_ceiling"] = 100 * rec["gbps"] / ceilings["copy_gbps"]


def _speedups(records: list[dict[str, Any]]) -> None:
    """Add ``speedup_vs_naive`` (naive step time / this one's) and ``mem_ratio_vs_naive`` (extra peak / naive's)."""
    naive = {
        (r["workload"], r["tokens"], r["hidden"], r["vocab"]): r
        for r in records
        if r["impl"] == "naive" and r.get("status") == "ok"
    }
    for r in records:
        base = naive.get((r["workload"], r["tokens"], r["hidden"], r["vocab"]))
        if base is not None and r.get("status") == "ok":
            r["speedup_vs_naive"] = base["step_ms"] / r["step_ms"]
            r["mem_ratio_vs_naive"] = r["step_peak_mb"] / base["step_peak_mb"] if base["step_peak_mb"] > 0 else None


def derive(records: list[dict[str, Any]], ceilings: dict[str, float] | None) -> None:
    """Add the derived figures to every ok record (in place): throughput, % of ``ceilings``, ratios to naive."""
    for r in records:
        _derive_one(r, ceilings)
    _speedups(records)


CSV_FIELDS = (
    "workload",
    "impl",
    "impl_label",
    "status",
    "device",
    "dtype",
    "tokens",
    "hidden",
    "vocab",
    "repeats",
    "fwd_ms",
    "bwd_ms",
    "step_ms",
    "speedup_vs_naive",
    "fwd_peak_mb",
    "step_peak_mb",
    "mem_ratio_vs_naive",
    "grad_mb",
    "grads_included",
    "setup_mb",
    "memory_method",
    "tflops",
    "gbps",
    "pct_matmul_ceiling",
    "pct_copy_ceiling",
)


def write_results(records: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (one row per case) and then ``<stem>.json`` ({"meta", "results"}) under ``out_dir``, each
    atomically (a reader, or a crash, never sees half a file). The JSON goes last: a run killed between the two
    leaves a CSV holding every case the JSON holds (and at most this call's newer ones), never fewer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(csv_path, lambda fh: fh.write(buf.getvalue().encode()))
    text = json.dumps({"meta": meta, "results": records}, indent=1)
    atomic_write(json_path, lambda fh: fh.write(text.encode()))
    return json_path, csv_path


def _fmt(v: Any, digits: int = 1) -> str:
    """A table cell: ``-`` for a missing or non-finite value, floats with ``digits`` decimals and thousands commas."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not is_finite(v):
            return "-"
        return f"{v:,.{digits}f}"
    return str(v)


def print_table(records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """One rich table per workload."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    cuda = meta["device"] == "cuda"
    console.print(
        f"[bold]fastdpo bench[/] on {meta['device_name']} ({meta['device']}, {meta['dtype']}), "
        f"torch {meta['versions']['torch']}"
    )
    console.print(
        f"time = median over repeats ({meta['timer']}); {MEMORY_NOTE}; memory method: {meta['memory_method']}"
    )
    if meta.get("ceilings"):
        c = meta["ceilings"]
        console.print(f"measured ceilings: copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.0f} TFLOP/s")
    for workload in meta["workloads"]:
        rows = [r for r in records if r["workload"] == workload]
        if not rows:
            continue
        t = Table(title=f"workload {workload}: {WORKLOAD_TITLES[workload]}", show_lines=False)
        for col in (
            "impl",
            "N",
            "D",
            "V",
            "reps",
            "fwd ms",
            "bwd ms",
            "step ms",
            "× naive",
            "fwd MB",
            "step MB",
            "grad MB",
            "TFLOP/s" + (" (%ceil)" if cuda else ""),
            "status",
        ):
            t.add_column(
                col,
                justify="left" if col in ("impl", "status") else "right",
                overflow="fold",
                max_width=60 if col == "status" else None,
            )
        order = {name: i for i, name in enumerate(impl_names(workload))}
        for r in sorted(rows, key=lambda r: (r["vocab"], r["tokens"], r["hidden"], order.get(r["impl"], 99))):
            ok = r.get("status") == "ok"
            tf = _fmt(r.get("tflops"), 3 if not cuda else 0)
            if cuda and r.get("pct_matmul_ceiling") is not None:
                tf += f" ({r['pct_matmul_ceiling']:.0f}%)"
            t.add_row(
                r.get("impl_label", r["impl"]),
                str(r["tokens"]),
                str(r["hidden"] or "-"),
                str(r["vocab"]),
                _fmt(r.get("repeats")),
                _fmt(r.get("fwd_ms")),
                _fmt(r.get("bwd_ms")),
                _fmt(r.get("step_ms")),
                _fmt(r.get("speedup_vs_naive"), 2),
                _fmt(r.get("fwd_peak_mb"), 0),
                _fmt(r.get("step_peak_mb"), 0),
                _fmt(r.get("grad_mb"), 0),
                tf if ok else "-",
                "ok" if ok else r.get("status", "?"),
            )
        console.print(t)


WORKLOAD_TITLES = {
    "head": "per-token log-probs of hidden @ W.T, fwd + bwd (random upstream grad; hidden, W require grad)",
    "logprobs": "per-sequence log-probs from logits [B, T, V], fwd + bwd",
    "dpo": "sigmoid DPO loss from a fused linear head (policy + frozen reference), fwd + bwd",
}
