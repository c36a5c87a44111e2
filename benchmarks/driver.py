"""``fastdpo bench``: time and memory of fastdpo against naive PyTorch and the peers, on the current device.

Every (workload, implementation) runs in its own worker process (see :mod:`fastdpo.benchmarks.measure`), over its
shapes in ascending size. Results go to ``<out>/<device>-<timestamp>.json`` and ``.csv`` (with device, versions and
configuration), a rich table on stdout, and PNG plots of time and memory against vocabulary size and token count.
The JSON and CSV are rewritten (atomically) as results arrive, with ``meta.complete`` false until the run ends, so an
interrupted or crashed run keeps every finished case. Arguments and the output folder are checked, and the optional
plotting dependency (matplotlib) imported, before anything is measured: without matplotlib the plots are skipped with
a warning at start.

CPU defaults (fp32) finish in a few minutes on a 2-core machine; GPU defaults (bf16) sweep real sizes:
D ∈ {896, 2048, 4096}, V ∈ {32000, 128256, 151936, 262144}, up to 32k tokens.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdpo.atomic import atomic_write, remove_stale_tmp_in
from fastdpo.benchmarks.impls import IMPLS, WORKLOADS, Shape, flops, get_impl, impl_names, min_bytes
from fastdpo.benchmarks.measure import MALLOC_ENV, is_finite, measure_ceilings
from fastdpo.cli import ArgParser, UsageError, float_in, int_in, make_output_dir, output_dir, resolve_device, threads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUBJECTS = ("naive", "fastdpo")  # always measured; every other implementation is a peer that may be skipped
MEMORY_NOTE = (
    "memory = extra peak over setup (inputs, weights, upstream gradient already allocated); it INCLUDES the "
    "gradient buffers backward allocates for the inputs (grad_mb column: hidden.grad + weight.grad, or "
    "logits.grad)"
)
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def default_shapes(workload: str, device: str, quick: bool) -> list[Shape]:
    """The default sweep of ``workload`` on ``device``: a vocabulary sweep plus a token sweep (plus a hidden-size sweep
    on GPU). ``quick``: two tiny shapes (tests)."""
    if quick:
        d = 0 if workload == "logprobs" else 32
        return [Shape(64, d, 100), Shape(64, d, 300)]
    if device == "cuda":
        if workload == "head":
            return _union(
                [Shape(8192, 4096, v) for v in (32000, 128256, 151936, 262144)],
                [Shape(n, 4096, 128256) for n in (2048, 8192, 16384, 32768)],
                [Shape(8192, d, 151936) for d in (896, 2048, 4096)],
            )
        if workload == "logprobs":
            return _union(
                [Shape(8192, 0, v) for v in (32000, 128256, 151936, 262144)],
                [Shape(n, 0, 128256) for n in (2048, 8192, 32768)],
            )
        return _union(
            [Shape(8192, 4096, v) for v in (32000, 128256, 151936)], [Shape(n, 4096, 128256) for n in (2048, 16384)]
        )
    if workload == "head":
        return _union([Shape(2048, 512, v) for v in (8192, 32000, 128256)], [Shape(n, 512, 32000) for n in (512, 1024)])
    if workload == "logprobs":
        return _union([Shape(2048, 0, v) for v in (8192, 32000, 128256)], [Shape(n, 0, 32000) for n in (512, 1024)])
    return [Shape(2048, 512, v) for v in (8192, 32000)]


def _union(*groups: list[Shape]) -> list[Shape]:
    seen: dict[Shape, None] = {}
    for group in groups:
        for s in group:
            seen.setdefault(s, None)
    return list(seen)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = list(dict.fromkeys(v for v in text.replace(",", " ").split() if v))
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="fastdpo bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--tokens", type=_int_list, default=None, help="token counts N, e.g. 2048,8192")
    p.add_argument("--hidden", type=_int_list, default=None, help="hidden sizes D")
    p.add_argument("--vocab", type=_int_list, default=None, help="vocabulary sizes V")
    p.add_argument(
        "--impls",
        type=_name_list,
        default=None,
        help=f"implementations (default all): {sorted({i.name for i in IMPLS})}",
    )
    p.add_argument("--workloads", type=_name_list, default=None, help=f"workloads (default all): {list(WORKLOADS)}")
    p.add_argument("--repeats", type=int_in(1), default=None, help="timed repeats per case (default 3 CPU, 10 GPU)")
    p.add_argument(
        "--time-budget",
        type=float_in(0.0, low_open=True),
        default=None,
        help="stop repeating a case once this many seconds are spent (default 12 CPU, 30 GPU; >=1 repeat)",
    )
    p.add_argument(
        "--max-case-seconds",
        type=float_in(0.0, low_open=True),
        default=None,
        help="skip a peer's shape whose step, extrapolated from that peer's previous shape, would take "
        "longer (default 40 CPU, 60 GPU; naive and fastdpo always run)",
    )
    p.add_argument(
        "--total-seconds",
        type=float_in(0.0),
        default=None,
        help="wall-clock budget of the whole run: cases that would end later are skipped (default 540 on "
        "CPU, 0 = none on GPU); naive and fastdpo run first, then the peers",
    )
    p.add_argument("--out", type=output_dir, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke test)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=threads, default=None, help="torch threads in the workers (CPU)")
    return p


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("fastdpo", "triton", "trl", "liger-kernel", "transformers", "cut-cross-entropy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def _run_worker(spec: dict[str, Any], timeout: float, progress: Any, on_records: Any = None) -> list[dict[str, Any]]:
    """Run one worker process; advance ``progress`` (and call ``on_records(records so far)``) as it writes records;
    return its records."""
    with tempfile.TemporaryDirectory(prefix="fastdpo-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        env = {**os.environ, **MALLOC_ENV}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastdpo.benchmarks.measure", spec_path, out_path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        start, done, records = time.monotonic(), 0, []
        while True:
            try:
                proc.wait(timeout=0.5)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
            if os.path.exists(out_path):
                try:
                    with open(out_path) as fh:
                        records = json.load(fh)
                except (OSError, json.JSONDecodeError):
                    pass
            if len(records) > done:
                progress.update(len(records) - done)
                done = len(records)
                if on_records is not None:
                    on_records(records)
            if finished:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                break
        log = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    seen = {(r["tokens"], r["hidden"], r["vocab"]) for r in records}
    for n, d, v in spec["shapes"]:
        if (n, d, v) not in seen:
            reason = "timeout" if proc.returncode in (-9, None) else f"worker exited {proc.returncode}"
            tail = log.strip().splitlines()[-1:] if log.strip() else []
            records.append(
                {
                    "workload": spec["workload"],
                    "impl": spec["impl"],
                    "tokens": n,
                    "hidden": d,
                    "vocab": v,
                    "dtype": spec["dtype"],
                    "device": spec["device"],
                    "status": f"error: {reason} {' '.join(tail)}"[:300],
                }
            )
            progress.update(1)
    return records


def _derive(rec: dict[str, Any], ceilings: dict[str, float] | None) -> None:
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


def plotting_available() -> str | None:
    """``None`` when the plots can be drawn (matplotlib imports, with its non-interactive Agg backend), else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install failing in its own way
        return f"matplotlib is not usable ({type(exc).__name__}: {exc})"
    return None


def _fmt(v: Any, digits: int = 1) -> str:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastdpo bench``; returns the exit code (0 when every runnable case ran or was skipped, 1 when
    a case failed). A usage error prints one line on stderr and raises :class:`fastdpo.cli.UsageError` (a
    ``SystemExit`` with code 2), as argparse does for a malformed argument."""
    args = build_parser().parse_args(argv)
    try:
        plan, device, dtype, settings = _plan(args)
    except UsageError as exc:
        print(f"fastdpo bench: {exc}", file=sys.stderr)
        raise
    return _run(args, argv, plan, device, dtype, settings)


def _plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, list[Shape]]], torch.device, str, dict[str, Any]]:
    """Everything checked before measuring: device, names, shapes, the output folder, plotting."""
    device = resolve_device("--device", args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if cuda else "float32")
    workloads = args.workloads or list(WORKLOADS)
    for w in workloads:
        if w not in WORKLOADS:
            raise UsageError(f"--workloads: unknown workload {w!r}; choices: {list(WORKLOADS)}")
    if args.impls:
        unknown = [n for n in args.impls if n not in {i.name for i in IMPLS}]
        if unknown:
            raise UsageError(
                f"--impls: unknown implementation(s) {unknown}; choices: {sorted({i.name for i in IMPLS})}"
            )
    settings = {
        "workloads": workloads,
        "repeats": args.repeats or (1 if args.quick else (10 if cuda else 3)),
        "time_budget": args.time_budget if args.time_budget is not None else (30.0 if cuda else 12.0),
        "max_case": args.max_case_seconds if args.max_case_seconds is not None else (60.0 if cuda else 40.0),
        "total_s": args.total_seconds if args.total_seconds is not None else (0.0 if cuda else 540.0),
    }
    plan: list[tuple[str, str, list[Shape]]] = []
    for workload in workloads:
        shapes = default_shapes(workload, device.type, args.quick)
        if args.tokens or args.hidden or args.vocab:
            base = shapes[0]
            shapes = [
                Shape(n, d, v)
                for n, d, v in itertools.product(
                    args.tokens or [base.tokens], args.hidden or [base.hidden or 512], args.vocab or [base.vocab]
                )
            ]
        shapes = _union([s.normalized(workload) for s in shapes])
        names = impl_names(workload)
        if args.impls:
            names = [n for n in names if n in args.impls]
        plan += [(workload, name, shapes) for name in names]
    if not plan:
        raise UsageError(f"--impls {','.join(args.impls)}: none of them implements --workloads {','.join(workloads)}")
    plan.sort(key=lambda item: item[1] not in SUBJECTS)  # naive and fastdpo of every workload first, then peers
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    need = max(2 * min_bytes(w, s, elem)["fwd"] for w, _, shapes in plan for s in shapes)  # inputs + their grads
    if cuda:
        available = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        available = psutil.virtual_memory().available
    if need > available:
        raise UsageError(
            f"--tokens/--hidden/--vocab: the largest case's inputs and their gradients alone need "
            f"{need / 2**30:,.1f} GiB, {available / 2**30:,.1f} GiB available on {device.type}"
        )
    make_output_dir("--out", args.out)
    remove_stale_tmp_in(args.out)  # what killed earlier runs left half-written
    settings["plots"] = not args.no_plots
    if not args.no_plots:
        why = plotting_available()
        if why is not None:
            print(
                f"fastdpo bench: warning: {why}: results are written, plots skipped (pip install matplotlib, or "
                "pass --no-plots)",
                file=sys.stderr,
            )
            settings["plots"] = False
    return plan, device, dtype, settings


def _run(
    args: argparse.Namespace,
    argv: list[str] | None,
    plan: list[tuple[str, str, list[Shape]]],
    device: torch.device,
    dtype: str,
    settings: dict[str, Any],
) -> int:
    cuda = device.type == "cuda"
    repeats, time_budget, max_case, total_s = (settings[k] for k in ("repeats", "time_budget", "max_case", "total_s"))
    started = _dt.datetime.now(_dt.timezone.utc)
    meta: dict[str, Any] = {
        "device": device.type,
        "device_name": _device_name(device),
        "dtype": dtype,
        "versions": _versions(),
        "started": started.isoformat(timespec="seconds"),
        "cpu_threads": args.threads or torch.get_num_threads(),
        "timer": "CUDA events" if cuda else "time.perf_counter",
        "workloads": settings["workloads"],
        "memory_method": "torch.cuda.max_memory_allocated - allocated after setup"
        if cuda
        else (
            "peak RSS: VmHWM - VmRSS after setup, high-water mark reset via /proc/self/clear_refs, one process per impl"
        ),
        "memory_note": MEMORY_NOTE,
        "grads_included": True,
        "complete": False,
        "config": {
            "repeats": repeats,
            "time_budget_s": time_budget,
            "max_case_seconds": max_case,
            "total_seconds": total_s,
            "quick": args.quick,
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "plan": [[w, n, [[s.tokens, s.hidden, s.vocab] for s in shapes]] for w, n, shapes in plan],
        },
    }
    if cuda:
        meta["ceilings"] = measure_ceilings(device, getattr(torch, dtype))
        torch.cuda.empty_cache()
    stem = f"{'quick-' if args.quick else ''}{device.type}-{started.strftime('%Y%m%d-%H%M%S')}"

    from tqdm import tqdm

    records: list[dict[str, Any]] = []

    def save(extra: Sequence[dict[str, Any]] = ()) -> None:
        """Rewrite the JSON/CSV with every record so far (``extra``: the running worker's)."""
        current = [dict(r) for r in [*records, *extra]]
        for r in current:
            _derive(r, meta.get("ceilings"))
        _speedups(current)
        write_results(current, meta, args.out, stem)

    total = sum(len(shapes) for _, _, shapes in plan)
    deadline = time.time() + total_s if total_s > 0 else None
    with tqdm(total=total, desc="fastdpo bench", unit="case", file=sys.stderr, dynamic_ncols=True) as progress:
        for workload, name, shapes in plan:
            progress.set_postfix_str(f"{workload}/{name}")
            impl = get_impl(workload, name)
            reason = impl.unavailable(device)
            if reason is None and deadline is not None and time.time() > deadline - 15:
                reason = "skipped: run time budget (--total-seconds) spent"
            if reason is not None:
                for s in shapes:
                    records.append(
                        {
                            "workload": workload,
                            "impl": name,
                            "tokens": s.tokens,
                            "hidden": s.hidden,
                            "vocab": s.vocab,
                            "dtype": dtype,
                            "device": device.type,
                            "status": reason,
                        }
                    )
                progress.update(len(shapes))
                save()
                continue
            spec = {
                "workload": workload,
                "impl": name,
                "device": str(device),
                "dtype": dtype,
                "shapes": [[s.tokens, s.hidden, s.vocab] for s in shapes],
                "repeats": repeats,
                "time_budget": time_budget,
                "max_case_seconds": max_case,
                "threads": args.threads,
                "peer": name not in SUBJECTS,
                "deadline": deadline,
            }
            timeout = 120.0 + len(shapes) * (max_case * (repeats + 2) + 30.0)
            records += _run_worker(spec, timeout, progress, on_records=save)
            save()

    for r in records:
        _derive(r, meta.get("ceilings"))
    _speedups(records)
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["wall_s"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
    meta["complete"] = True
    plots: list[Path] = []
    if settings["plots"]:
        from fastdpo.benchmarks.plots import plot_results

        try:
            plots = plot_results(records, meta, args.out, stem)
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not cost the measurements
            print(
                f"fastdpo bench: warning: plotting failed ({type(exc).__name__}: {exc}); results are in the JSON "
                "and CSV",
                file=sys.stderr,
            )
    meta["plots"] = [str(p) for p in plots]
    json_path, csv_path = write_results(records, meta, args.out, stem)
    print_table(records, meta)
    print(f"wrote {json_path}\nwrote {csv_path}" + "".join(f"\nwrote {p}" for p in plots))
    failed = [r for r in records if str(r.get("status", "")).startswith("error")]
    for r in failed:
        print(
            f"FAILED {r['workload']}/{r['impl']} N={r['tokens']} D={r['hidden']} V={r['vocab']}: {r['status']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
