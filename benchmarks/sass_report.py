"""The SASS report of every Triton kernel specialization fastdpo launches, and the compile gate's command line.

``python -m fastdpo.benchmarks.sass_report [--out benchmarks/results] [--tag NAME] [--arch 90 80] [--gate]``

No GPU is needed: :mod:`fastdpo.benchmarks.sass_specs` enumerates the specializations from the library's own launch
code on ``meta`` tensors, :mod:`fastdpo.benchmarks.sass_compile` compiles them ahead of time and reads the cubins
(resources, spills, the hot loop's SASS, instructions per logit element). This module writes the tables:
``OUT/sass-TAG.md`` (the targets, a summary per kernel variant, every specialization) and ``OUT/sass-TAG.json`` (one
row per specialization and arch).

``--gate`` compiles everything for every ``--arch`` and exits 1 when any specialization fails to compile or spills, or a
hot-loop target is missed (the CI compile gate, ``tests/test_compile_gate.py``), printing a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastdpo.benchmarks.sass_compile import (
    ARCHS,
    CompiledStats,
    compile_all,
    elements_per_iteration,
    gate,
    per_element,
    target_results,
    tool_versions,
)
from fastdpo.benchmarks.sass_specs import Specialization, enumerate_specializations


def _describe(sp: Specialization) -> str:
    sig = ", ".join(
        f"{k}:{v}{'/' + sp.attrs[k] if k in sp.attrs else ''}" for k, v in sp.signature.items() if v != "constexpr"
    )
    const = ", ".join(f"{k}={v}" for k, v in sp.constexprs.items())
    return f"{const}; num_warps={sp.num_warps}; {sig}"


def _rows(specs: list[Specialization], results: dict) -> list[dict[str, Any]]:
    rows = []
    for sp in specs:
        for arch in ARCHS:
            st = results.get((sp.key, arch))
            if st is None:
                continue
            row: dict[str, Any] = {
                "kernel": sp.kernel,
                "arch": arch,
                "specialization": _describe(sp),
                "situations": [asdict(s) for s in sp.situations],
            }
            if isinstance(st, str):
                row["error"] = st
            else:
                row.update(asdict(st))
                row["elements_per_pass"] = elements_per_iteration(sp, st)
                row["instr_per_element"] = per_element(sp, st)
            rows.append(row)
    return rows


def _loop_cell(st: CompiledStats) -> tuple[str, str, str, str, str, str]:
    if not st.loops:
        return ("-",) * 6
    lp = st.loops[0]

    def fmt(d: dict) -> str:
        return " ".join(f"{v}x{k}" for k, v in sorted(d.items(), key=lambda kv: -int(kv[0]))) or "-"

    return (str(lp.instructions), str(lp.barriers), str(lp.shuffles), str(lp.mufu), fmt(lp.loads), fmt(lp.stores))


def _variant(sp: Specialization) -> str:
    """Kernel variant for the summary: its flag constexprs and element types (ints and alignment left out)."""
    flags = [f"{k}" for k, v in sp.constexprs.items() if isinstance(v, bool) and v]
    ptrs = [
        v[1:]
        for k, v in sp.signature.items()
        if v.startswith("*") and k.split("_")[0] in ("logits", "x", "values", "grad", "out")
    ]
    labels = [v[1:] for k, v in sp.signature.items() if k.startswith("labels")]
    strided = [k for k in ("stride_v", "gstride_v") if k in sp.signature and sp.constexprs.get(k) != 1]
    layout = [f"{'+'.join(strided)} != 1"] if strided else []
    return " ".join(flags + ["/".join(dict.fromkeys(ptrs))] + ([f"labels {labels[0]}"] if labels else []) + layout)


def targets_table(specs: list[Specialization], results: dict) -> list[str]:
    lines = [
        "## Targets (sm_90, unit vocabulary stride, worst specialization)",
        "",
        "| kernel | variant | target instr/elem | measured | BAR in loop | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in target_results(specs, results):
        lines.append(
            f"| `{t['kernel']}` | {t['variant']} | <= {t['bound']} | {t['instr_per_element']:.2f} | "
            f"{t['barriers']} | {'yes' if t['met'] else 'NO'} |"
        )
    return lines + [""]


def summary_table(specs: list[Specialization], results: dict, arch: int) -> list[str]:
    """Per kernel variant on ``sm_<arch>``: ranges over its specializations (vocabulary sizes, layouts, alignment)."""
    groups: dict[tuple[str, str], list[tuple[Specialization, CompiledStats]]] = {}
    for sp in specs:
        st = results.get((sp.key, arch))
        if isinstance(st, CompiledStats):
            groups.setdefault((sp.kernel, _variant(sp)), []).append((sp, st))

    def rng(values: list[float], fmt: str = "{:g}") -> str:
        lo, hi = min(values), max(values)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    lines = [
        f"## Summary (sm_{arch}; ranges over each variant's specializations)",
        "",
        "| kernel | variant | specializations | regs | spills | loop instr | BAR | SHFL | MUFU | main-loop loads | "
        "instr/elem |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, variant), items in groups.items():
        sts = [st for _, st in items]
        loops = [st.loops[0] for st in sts if st.loops]
        ipes = [v for sp, st in items if (v := per_element(sp, st)) is not None]
        loads = sorted(
            {" ".join(f"{n}x{w}" for w, n in sorted(lp.loads.items(), key=lambda kv: -int(kv[0]))) for lp in loops}
        )
        lines.append(
            f"| `{kernel}` | {variant} | {len(items)} | {rng([st.registers for st in sts])} | "
            f"{max(st.spill_instructions for st in sts)} | "
            + (
                f"{rng([lp.instructions for lp in loops])} | {rng([lp.barriers for lp in loops])} | "
                f"{rng([lp.shuffles for lp in loops])} | {rng([lp.mufu for lp in loops])} | {', '.join(loads)} | "
                if loops
                else "- | - | - | - | - | "
            )
            + (f"{rng(ipes, '{:.2f}')} |" if ipes else "- |")
        )
    return lines + [""]


def markdown(specs: list[Specialization], results: dict, tag: str, versions: dict[str, str]) -> str:
    lines = [
        f"# SASS report `{tag}`",
        "",
        f"Generated by `python -m fastdpo.benchmarks.sass_report --tag {tag}` "
        f"(triton {versions['triton']}, torch {versions['torch']}, ptxas `{versions['ptxas']}`), no GPU: every "
        "specialization the library launches for the enumerated grid, compiled ahead of time for sm_90 and sm_80.",
        "",
        "Columns: registers / stack bytes / shared-memory bytes / spill instructions (STL+LDL) of the cubin; for the "
        "hot loop (most 128-bit loads): SASS instructions, barriers, shuffles, MUFU ops, global loads and stores by "
        "width in bits (`2x128` = two 128-bit loads), logit elements per thread per pass (ptxas' unrolling "
        "included), and **instr/elem** = loop instructions / elements per thread per pass.",
        "",
    ]
    n_fail = sum(1 for v in results.values() if isinstance(v, str))
    n_spill = sum(1 for v in results.values() if not isinstance(v, str) and v.spill_instructions)
    max_reg = max((v.registers for v in results.values() if not isinstance(v, str)), default=0)
    lines += [
        f"{len(specs)} specializations x {len(ARCHS)} archs = {len(results)} compiles: {n_fail} failed, "
        f"{n_spill} with spills, at most {max_reg} registers.",
        "",
    ]
    lines += targets_table(specs, results)
    lines += summary_table(specs, results, 90)
    by_kernel: dict[str, list[Specialization]] = {}
    for sp in specs:
        by_kernel.setdefault(sp.kernel, []).append(sp)
    for kernel, group in by_kernel.items():
        lines += [f"## `{kernel}` ({len(group)} specializations)", ""]
        lines += [
            "| arch | specialization (constexprs; num_warps; args: type/16-divisible) | e.g. launched by | regs | "
            "stack | smem | spills | loop instr | BAR | SHFL | MUFU | loads | stores | elem/thread | instr/elem |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sp in group:
            for arch in ARCHS:
                st = results.get((sp.key, arch))
                if st is None:
                    continue
                where = "; ".join(f"{s.op}: {s.detail}" for s in sp.situations[:2])
                if isinstance(st, str):
                    lines.append(f"| sm_{arch} | {_describe(sp)} | {where} | FAILED: {st[:200]} |" + " |" * 11)
                    continue
                ipe = per_element(sp, st)
                lines.append(
                    f"| sm_{arch} | {_describe(sp)} | {where} | {st.registers} | {st.stack} | {st.shared} | "
                    f"{st.spill_instructions} | " + " | ".join(_loop_cell(st)) + " | "
                    f"{elements_per_iteration(sp, st) or '-'} | {'-' if ipe is None else f'{ipe:.2f}'} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdpo.benchmarks.sass_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="benchmarks/results", help="directory for sass-TAG.md / sass-TAG.json")
    parser.add_argument("--tag", default="current", help="report name (sass-TAG.*)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=[80, 86, 89, 90])
    parser.add_argument("--workers", type=int, default=2, help="parallel compiles")
    parser.add_argument("--gate", action="store_true", help="compile only; print a JSON summary; exit 1 on failure")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "sass_report: unset TRITON_INTERPRET (ahead-of-time compilation needs the compiled kernels)",
            file=sys.stderr,
        )
        return 2
    if args.gate:
        summary = gate(tuple(args.arch), args.workers)
        print(json.dumps(summary))
        return 0 if summary["ok"] else 1
    specs = enumerate_specializations()
    results = compile_all(specs, tuple(args.arch), args.workers)
    versions = tool_versions()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sass-{args.tag}.md").write_text(markdown(specs, results, args.tag, versions))
    payload = {"tag": args.tag, "versions": versions, "rows": _rows(specs, results)}
    (out / f"sass-{args.tag}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {out / f'sass-{args.tag}.md'} and .json: {len(specs)} specializations")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
