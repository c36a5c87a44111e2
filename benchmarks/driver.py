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
import datetime as _dt
import importlib.metadata
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

from fastdpo.atomic import remove_stale_tmp_in
from fastdpo.benchmarks.bench_results import CSV_FIELDS, MEMORY_NOTE, derive, print_table, status_record, write_results
from fastdpo.benchmarks.impls import IMPLS, WORKLOADS, Shape, get_impl, impl_names, min_bytes
from fastdpo.benchmarks.measure import MALLOC_ENV, measure_ceilings
from fastdpo.benchmarks.plots import plotting_available
from fastdpo.cli import ArgParser, UsageError, float_in, int_in, make_output_dir, output_dir, resolve_device, threads

# CSV_FIELDS (now in fastdpo.benchmarks.bench_results) stays importable from here, where it was
__all__ = ["CSV_FIELDS", "build_parser", "default_shapes", "main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUBJECTS = ("naive", "fastdpo")  # always measured; every other implementation is a peer that may be skipped
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
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--tokens", type=_int_list, help="token counts N, e.g. 2048,8192")
    p.add_argument("--hidden", type=_int_list, help="hidden sizes D")
    p.add_argument("--vocab", type=_int_list, help="vocabulary sizes V")
    p.add_argument("--impls", type=_name_list, help=f"implementations (default all): {sorted({i.name for i in IMPLS})}")
    p.add_argument("--workloads", type=_name_list, help=f"workloads (default all): {list(WORKLOADS)}")
    p.add_argument("--repeats", type=int_in(1), help="timed repeats per case (default 3 CPU, 10 GPU)")
    p.add_argument(
        "--time-budget",
        type=float_in(0.0, low_open=True),
        help="stop repeating a case once this many seconds are spent (default 12 CPU, 30 GPU; >=1 repeat)",
    )
    p.add_argument(
        "--max-case-seconds",
        type=float_in(0.0, low_open=True),
        help="skip a peer's shape whose step, extrapolated from that peer's previous shape, would take "
        "longer (default 40 CPU, 60 GPU; naive and fastdpo always run)",
    )
    p.add_argument(
        "--total-seconds",
        type=float_in(0.0),
        help="wall-clock budget of the whole run: cases that would end later are skipped (default 540 on "
        "CPU, 0 = none on GPU); naive and fastdpo run first, then the peers",
    )
    p.add_argument("--out", type=output_dir, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke test)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=threads, help="torch threads in the workers (CPU)")
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
            status = f"error: {reason} {' '.join(tail)}"[:300]
            records.append(
                status_record(spec["workload"], spec["impl"], Shape(n, d, v), spec["dtype"], spec["device"], status)
            )
            progress.update(1)
    return records


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
        derive(current, meta.get("ceilings"))
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
                records += [status_record(workload, name, s, dtype, device.type, reason) for s in shapes]
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

    derive(records, meta.get("ceilings"))
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
