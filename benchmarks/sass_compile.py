"""Ahead-of-time compile of Triton kernel specializations (:mod:`fastdpo.benchmarks.sass_specs`) and what the cubin
says: resources, spills, the hot loop's SASS, instructions per logit element against issue 15's targets, and the CI
compile gate (:func:`gate`).

Each specialization is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with the ptxas bundled in
the Triton wheel; no GPU is needed. The cubin is read back with the wheel's ``cuobjdump``: registers / stack / shared
memory from ``-res-usage``, spills as local-memory instructions (``STL`` / ``LDL``) in the SASS.

Hot loop: every backward branch in the SASS closes a loop; the kernel's hot loop is the one with the most 128-bit
loads (then the largest): fallback paths (unaligned rows, zero fill) are the others. Reported per loop:
SASS instructions, barriers (``BAR``), shuffles (``SHFL``), ``MUFU`` (exp2 / log2 / rcp), global loads and stores with
their widths, and **instructions per logit element per thread** = loop instructions ÷ (elements per iteration ÷
threads), the figure the kernel targets are set in (a loop ptxas unrolled handles a multiple of the block per pass: the
elements are counted from the loop's global-load bits).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdpo.benchmarks.sass_specs import Specialization, check_compiled_mode, cuda_backend, enumerate_specializations

ARCHS = (90, 80)


@dataclass
class LoopStats:
    instructions: int
    barriers: int
    shuffles: int
    mufu: int
    loads: dict[str, int]
    stores: dict[str, int]


@dataclass
class CompiledStats:
    arch: int
    registers: int
    stack: int
    local: int
    shared: int
    spill_instructions: int
    instructions: int
    loops: list[LoopStats]
    compile_s: float


def _kernel_fn(name: str):
    from fastdpo.kernels import linear_fold, logprobs, segment_sum

    for mod in (logprobs, linear_fold, segment_sum):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRA = re.compile(r"\bBRA(?:\.\w+)*\s+`?\(?(0x[0-9a-f]+)")
_MEM = re.compile(r"\b(LDG|STG|LDL|STL|LDS|STS)((?:\.[A-Z0-9]+)*)")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` of every SASS instruction (predicate included) in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_INSTR.search, text.splitlines()) if m]


def _width(mods: str) -> str:
    for w in ("128", "64", "U16", "S16", "U8", "S8"):
        if f".{w}" in mods:
            return {"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(w, w)
    return "32"


def loop_stats(instrs: list[tuple[int, str]]) -> list[LoopStats]:
    """One entry per backward branch (a loop), the hot loop first."""
    loops = []
    for addr, ins in instrs:
        m = _BRA.search(ins)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for a, i in instrs if target <= a <= addr]
        loads: dict[str, int] = {}
        stores: dict[str, int] = {}
        for i in body:
            mm = _MEM.search(i)
            if mm and mm.group(1) in ("LDG", "STG"):
                d = loads if mm.group(1) == "LDG" else stores
                w = _width(mm.group(2))
                d[w] = d.get(w, 0) + 1
        loops.append(
            LoopStats(
                instructions=len(body),
                barriers=sum(1 for i in body if re.search(r"\bBAR\b|\bBAR\.", i)),
                shuffles=sum(1 for i in body if "SHFL" in i),
                mufu=sum(1 for i in body if "MUFU" in i),
                loads=loads,
                stores=stores,
            )
        )
    # the hot loop is the one with the most full-width (128-bit) loads; a kernel's fallback paths (unaligned rows,
    # zero fill) come after it
    return sorted(loops, key=lambda s: (-s.loads.get("128", 0), -s.instructions))


def _run(tool: str, path: str, *flags: str) -> str:
    return subprocess.run([_bin(tool), *flags, path], check=True, capture_output=True, text=True).stdout


def compile_specialization(sp: Specialization, arch: int, sass: bool = True) -> CompiledStats:
    """Compile ``sp`` for ``sm_<arch>`` and read its resources; with ``sass`` also disassemble it (loops, spills).

    Without ``sass`` (the gate: disassembly is most of the time) spills show as stack / local-memory bytes.
    """
    import triton
    from triton.compiler import ASTSource

    target, backend = cuda_backend(arch)
    kernel = _kernel_fn(sp.kernel)
    options = backend.parse_options({"num_warps": sp.num_warps})
    attrs = {(kernel.arg_names.index(k),): backend.parse_attr(v) for k, v in sp.attrs.items()}
    src = ASTSource(kernel, dict(sp.signature), dict(sp.constexprs), attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    elapsed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = _RES.search(_run("cuobjdump", path, "-res-usage"))
        text = _run("cuobjdump", path, "-sass") if sass else ""
    assert res is not None, "cuobjdump -res-usage printed no resource line"
    instrs = parse_sass(text)
    spills = sum(1 for _, i in instrs if (m := _MEM.search(i)) and m.group(1) in ("LDL", "STL"))
    stats = CompiledStats(
        arch=arch,
        registers=int(res.group(1)),
        stack=int(res.group(2)),
        shared=int(res.group(3)),
        local=int(res.group(4)),
        spill_instructions=spills,
        instructions=len(instrs),
        loops=loop_stats(instrs),
        compile_s=round(elapsed, 3),
    )
    return stats


_compiled: dict[tuple[str, int], CompiledStats] = {}


def compile_all(
    specs: list[Specialization], archs: tuple[int, ...] = ARCHS, workers: int = 2, sass: bool = True
) -> dict[tuple[str, int], CompiledStats | str]:
    """Compile every specialization for every arch (cached in-process); failures map to their error text."""
    check_compiled_mode()
    jobs = [
        (sp, arch)
        for sp in specs
        for arch in archs
        if (sp.key, arch) not in _compiled or (sass and not _compiled[(sp.key, arch)].instructions)
    ]
    results: dict[tuple[str, int], CompiledStats | str] = {}
    # processes, not threads: Triton's compiler passes hold the GIL. Forked workers inherit the imported kernels.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context) as pool:
        futures = {pool.submit(compile_specialization, sp, arch, sass): (sp.key, arch) for sp, arch in jobs}
        for fut in concurrent.futures.as_completed(futures):
            key = futures[fut]
            try:
                _compiled[key] = fut.result()
            except Exception as exc:  # a failed compile is a gate failure, reported with its message
                results[key] = f"{type(exc).__name__}: {exc}"[:2000]
    for sp in specs:
        for arch in archs:
            if (sp.key, arch) in _compiled:
                results[(sp.key, arch)] = _compiled[(sp.key, arch)]
    return results


# ---------------------------------------------------------------------------------------------------------------
# hot-loop figures, targets and the gate
# ---------------------------------------------------------------------------------------------------------------


#: pointer arguments a kernel's hot loop reads once per element (default: its first pointer argument)
_PER_ELEMENT_LOADS = {"segment_sum_kernel": ("order_ptr", "values_ptr")}
_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "i64": 64, "i32": 32}


def elements_per_iteration(sp: Specialization, st: CompiledStats) -> float | None:
    """Elements one thread handles per pass through the hot loop: ``BLOCK / threads`` times ptxas' unroll factor,
    which shows as the loop's global-load bits over the bits one block step reads."""
    if not st.loops or not sp.block:
        return None
    per_step = sp.block / (32 * sp.num_warps)
    pointers = _PER_ELEMENT_LOADS.get(sp.kernel) or (next(k for k, v in sp.signature.items() if v.startswith("*")),)
    bits_per_element = sum(_BITS[sp.signature[p][1:]] for p in pointers)
    loaded = sum(int(w) * n for w, n in st.loops[0].loads.items())
    return per_step * max(1, round(loaded / (per_step * bits_per_element)))


def per_element(sp: Specialization, st: CompiledStats) -> float | None:
    """Hot-loop SASS instructions per logit element per thread."""
    elems = elements_per_iteration(sp, st)
    return None if elems is None else st.loops[0].instructions / elems


#: issue 15's hot-loop targets on sm_90: (kernel, required flags, logits dtype, bound on instr/elem)
TARGETS = (
    ("logprobs_fwd_kernel", (), "bf16", 9.5),
    ("linear_fold_kernel", (), "fp32", 16.0),
    ("linear_fold_kernel", ("STATS", "ARGMAX"), "fp32", 35.0),
)


def target_specializations(specs: list[Specialization]) -> dict[int, list[Specialization]]:
    """For each entry of :data:`TARGETS`, its unit-stride specializations."""
    found: dict[int, list[Specialization]] = {}
    for i, (kernel, flags, dtype, _) in enumerate(TARGETS):
        for sp in specs:
            first_ptr = next(v for v in sp.signature.values() if v.startswith("*"))
            if (
                sp.kernel == kernel
                and first_ptr == f"*{dtype}"
                and not ("stride_v" in sp.signature and sp.constexprs.get("stride_v") != 1)
                and all(sp.constexprs.get(f) is True for f in flags)
                and not any(v is True and k not in flags for k, v in sp.constexprs.items())
            ):
                found.setdefault(i, []).append(sp)
    return found


def target_results(specs: list[Specialization], results: dict) -> list[dict[str, Any]]:
    """Each target against its worst specialization on sm_90: instructions per element and barriers in the loop."""
    out = []
    for i, group in target_specializations(specs).items():
        kernel, flags, dtype, bound = TARGETS[i]
        got = [
            (per_element(sp, st), st.loops[0].barriers)
            for sp in group
            if isinstance(st := results.get((sp.key, 90)), CompiledStats) and st.loops
        ]
        if got:
            ipe, bars = max(got)
            out.append(
                {
                    "kernel": kernel,
                    "variant": f"{' '.join(flags) or 'base'} {dtype}",
                    "bound": bound,
                    "instr_per_element": round(ipe, 2),
                    "barriers": bars,
                    "met": ipe <= bound and bars == 0,
                }
            )
    return out


def tool_versions() -> dict[str, str]:
    """The triton and torch versions and the bundled ptxas' version line."""
    import triton

    ptxas = subprocess.run([_bin("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas[-1] if ptxas else "?"}


def gate(archs: tuple[int, ...] = ARCHS, workers: int = 2) -> dict[str, Any]:
    """Compile everything; return a summary (``ok`` False on any failure or spill)."""
    t0 = time.perf_counter()
    specs = enumerate_specializations()
    results = compile_all(specs, archs, workers, sass=False)
    # the hot-loop targets: disassemble only their specializations (sm_90)
    targeted = [sp for group in target_specializations(specs).values() for sp in group]
    results.update(compile_all(targeted, (90,), workers, sass=True) if 90 in archs else {})
    targets = target_results(specs, results)
    failures = [f"{k[0]} sm_{k[1]}: {v}" for k, v in results.items() if isinstance(v, str)]
    spills = [
        f"{k[0]} sm_{k[1]}: {v.stack} B stack, {v.local} B local memory"
        for k, v in results.items()
        if not isinstance(v, str) and (v.spill_instructions or v.local or v.stack)
    ]
    kernels: dict[str, list[dict[str, Any]]] = {}
    for sp in specs:
        kernels.setdefault(sp.kernel, []).append({"constexprs": sp.constexprs, "signature": sp.signature})
    return {
        "ok": not failures and not spills and all(t["met"] for t in targets),
        "targets": targets,
        "compiles": len(results),
        "specializations": len(specs),
        "failures": failures,
        "spills": spills,
        "max_registers": max((v.registers for v in results.values() if not isinstance(v, str)), default=0),
        "kernels": kernels,
        "versions": tool_versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
