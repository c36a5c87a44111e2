"""One-shot GPU benchmark (issue #15 item 4): the Python side of ``benchmarks/gpu_run.sh``, which installs fastdpo and
the peers' wheels offline first and then runs::

    python -m fastdpo.benchmarks.gpu_bench OUTDIR [--dry-run] [--deadline EPOCH | --budget-s S] [--sections ...]

Sections, in this order (each module's docstring states its workload, the bytes or FLOPs it counts and its time
estimate at H100 rates):

* ``logprobs`` (:mod:`fastdpo.benchmarks.gpu_logprobs`) — log-probs from logits, fwd/bwd, bf16/fp32: GB/s and % of
  the measured copy bandwidth;
* ``head`` (:mod:`fastdpo.benchmarks.gpu_head`) — fused LM head vs naive, TRL, Liger, CCE: TFLOP/s and % of the
  measured ``torch.mm`` rate;
* ``dpo`` (:mod:`fastdpo.benchmarks.gpu_dpo`) — a DPO step on a Llama-3.2-1B-shaped model, DPOEngine vs TRL
  DPOTrainer: tokens/s and peak memory.

Every result carries a correctness column (:mod:`fastdpo.benchmarks.gpu_accuracy`). Timing, memory and the time guard:
:mod:`fastdpo.benchmarks.gpu_measure`; the output files: :mod:`fastdpo.benchmarks.gpu_report`. A case whose estimate
would end past the deadline is skipped (and recorded so); the outputs are complete on disk after every case.

``--dry-run``: CPU, the Triton kernels through the interpreter, tiny shapes, one warm-up and one timed call — the same
code paths end to end in well under a minute (``tests/test_gpu_run.py``).

Exit status: 0 when every case that ran gave a result that passed its check; 1 when a case raised (a kernel that
does not compile, say) or a check failed; 2 on bad arguments or no CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECTIONS = ("logprobs", "head", "dpo")
# (warm-up calls, timed calls) per section on the GPU; the dry run uses (1, 1)
REPEATS = {"logprobs": (3, 20), "head": (2, 5), "dpo": (2, 5)}
RESERVE_S = 10.0  # kept free at the end of the budget for the last writes and the report
DEFAULT_BUDGET_S = 390.0
VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "peft",
    "tokenizers",
    "datasets",
    "pyarrow",
    "fsspec",
    "huggingface-hub",
    "trl",
    "liger-kernel",
    "cut-cross-entropy",
    "flash-attn",
    "numpy",
    "matplotlib",
)
SMI_FIELDS = (
    "name",
    "driver_version",
    "pstate",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "power.draw",
    "power.limit",
    "temperature.gpu",
    "memory.used",
    "memory.total",
)


def _sections(text: str) -> list[str]:
    names = [s for s in text.replace(",", " ").split() if s]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad or text!r}; choose from {','.join(SECTIONS)}")
    return names


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr and exit 2, never a usage dump or a traceback
        print(f"gpu_bench: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastdpo.benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="folder for <device>-<stamp>.{json,csv,txt,png}")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreter")
    p.add_argument("--sections", type=_sections, default=list(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--budget-s",
        type=_positive,
        default=DEFAULT_BUDGET_S,
        help=f"seconds from now in which every case must end (default {DEFAULT_BUDGET_S:g})",
    )
    p.add_argument(
        "--deadline",
        type=_positive,
        default=None,
        help="absolute deadline (epoch seconds; gpu_run.sh passes its own start + budget)",
    )
    p.add_argument("--install-report", type=Path, default=None, help="gpu_install.py's JSON report (into the meta)")
    return p


# ---------------------------------------------------------------------------------------------------------- meta
def _nvidia_smi() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:200]}
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
    return dict(zip(SMI_FIELDS, values, strict=False))  # a field nvidia-smi lacks shortens the row


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "cuda_runtime": torch.version.cuda,
        }
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"name": f"{name} ({os.cpu_count()} cores)"}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    import fastdpo

    out["fastdpo"] = f"{fastdpo.__version__} ({Path(fastdpo.__file__).parent})"
    return out


def _install_report(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _section(name: str) -> Any:
    """The module of a section: ``fastdpo.benchmarks.gpu_<name>`` (``plan`` and ``run``)."""
    return importlib.import_module(f"fastdpo.benchmarks.gpu_{name}")


def _calls(name: str, dry_run: bool) -> tuple[int, int]:
    return (1, 1) if dry_run else REPEATS[name]


def _plan(sections: list[str], dry_run: bool, peers: dict[str, str]) -> dict[str, Any]:
    plan: dict[str, Any] = {}
    for name in sections:
        warm, reps = _calls(name, dry_run)
        plan[name] = {**_section(name).plan(dry_run, warm + reps, peers), "warmup_repeats": [warm, reps]}
    plan["total_estimate_s"] = round(sum(plan[name]["estimate_s"] for name in sections), 1)
    return plan


# ---------------------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    deadline = args.deadline if args.deadline is not None else start + args.budget_s
    if args.dry_run:  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTDPO_BACKEND", "triton")  # never fall back to the torch path silently

    import torch

    from fastdpo.benchmarks.gpu_measure import Context, free_memory
    from fastdpo.benchmarks.gpu_peers import peer_status
    from fastdpo.benchmarks.gpu_report import Report, slug

    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_bench: no CUDA device visible (use --dry-run for the CPU smoke run)", file=sys.stderr)
        return 2
    info = _device_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{'dryrun-cpu' if args.dry_run else slug(info['name'])}-{stamp}"
    peers = peer_status(args.sections)
    plan = _plan(args.sections, args.dry_run, peers)
    meta: dict[str, Any] = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stem": stem,
        "dry_run": args.dry_run,
        "argv": sys.argv[1:] if argv is None else argv,
        "device": info,
        "nvidia_smi_start": _nvidia_smi() if device.type == "cuda" else {},
        "versions": _versions(),
        "peers": peers,
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FASTDPO_BACKEND", "CUDA_VISIBLE_DEVICES")},
        "install": _install_report(args.install_report),
        "plan": plan,
        "budget": f"deadline in {deadline - start:.0f} s, {RESERVE_S:g} s reserved for the last writes; "
        f"estimated {plan['total_estimate_s']:.0f} s at H100 rates",
        "timing": "CUDA events around each call, warm-up calls untimed, median of the timed calls (perf_counter on "
        "CPU); peak = torch.cuda.max_memory_allocated after reset_peak_memory_stats before the timed calls",
        "accuracy_rule": "max|x - float64 ref| <= max|naive same-dtype - ref| + tol on a slice (gpu_accuracy.py)",
        "sections_done": [],
    }
    report = Report(args.outdir, stem, meta)
    print(f"gpu_bench: {info['name']} -> {report.paths['json']}")
    for dist, status in peers.items():
        print(
            f"  peer {dist}: {status if status.startswith('missing') else 'installed ' + status}"
            + ("  -> its cases are SKIPPED" if status.startswith("missing") else "")
        )
    print(
        "  plan at H100 rates: "
        + ", ".join(f"{k} {plan[k]['cases']} cases ~{plan[k]['estimate_s']:.0f} s" for k in args.sections)
        + f"; {meta['budget']}"
    )

    base_ctx = Context(
        device=device,
        dry_run=args.dry_run,
        warmup=1,
        repeats=1,
        deadline=deadline - RESERVE_S,
        sink=report,
        peers=peers,
    )
    for name in args.sections:
        warm, reps = _calls(name, args.dry_run)
        ctx = dataclasses.replace(base_ctx, warmup=warm, repeats=reps)
        t0 = time.time()
        print(f"== section {name} ({ctx.seconds_left():.0f} s left)")
        try:
            _section(name).run(ctx)
        except Exception as exc:  # a section-level failure (e.g. building its data) is recorded; the run goes on
            report.add({"section": name, "impl": "(section)", "status": f"error: {type(exc).__name__}: {exc}"[:300]})
        free_memory(device)
        meta["sections_done"].append({"section": name, "wall_s": round(time.time() - t0, 1)})
        report.plot()
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["wall_s"] = round(time.time() - start, 1)
    if device.type == "cuda":
        meta["nvidia_smi_end"] = _nvidia_smi()
    report.write()
    errors = [r for r in report.records if str(r.get("status", "")).startswith("error")]
    failed = [r for r in report.records if r.get("check") == "fail"]
    print(
        f"gpu_bench: {len(report.records)} records, {len(errors)} errors, {len(failed)} failed checks, "
        f"{meta['wall_s']:.0f} s; outputs {', '.join(str(p) for p in report.paths.values())}"
    )
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
