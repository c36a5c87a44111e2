"""Ahead-of-time compile of every Triton kernel specialization fastdpo launches, and a SASS report of the hot loops.

``python -m fastdpo.benchmarks.sass_report [--out benchmarks/results] [--tag NAME] [--arch 90 80] [--gate]``

No GPU is needed: the launches are produced by the library's own launch code (``fastdpo._launch.KernelLaunch``
built by ``_forward_launch`` / ``_fold_launch`` / ...) on ``meta`` tensors, for float32/bfloat16/float16 inputs,
int32/int64 labels, every constexpr flag and the tile and block sizes the CUDA planner picks for
``V`` in {32000, 50257, 128256, 151936, 262144}. Each launch is specialized exactly as Triton's JIT would
(``create_function_from_signature`` on the real arguments: dtypes, 16-divisibility and ``== 1`` of integers and
pointers), deduplicated, and compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with the ptxas bundled
in the Triton wheel. The cubin is read back with the wheel's ``cuobjdump``: registers / stack / shared memory from
``-res-usage``, spills as local-memory instructions (``STL`` / ``LDL``) in the SASS.

Hot loop: every backward branch in the SASS closes a loop; the kernel's hot loop is the one with the most 128-bit
loads (then the largest): fallback paths (unaligned rows, zero fill) are the others. Reported per loop:
SASS instructions, barriers (``BAR``), shuffles (``SHFL``), ``MUFU`` (exp2 / log2 / rcp), global loads and stores with
their widths, and **instructions per logit element per thread** = loop instructions ÷ (elements per iteration ÷
threads), the figure the kernel targets are set in (a loop ptxas unrolled handles a multiple of the block per pass: the
elements are counted from the loop's global-load bits).

``--gate`` compiles everything for every ``--arch`` and exits 1 when any specialization fails to compile or spills
(the CI compile gate, ``tests/test_compile_gate.py``); otherwise the tables are written to
``OUT/sass-TAG.md`` and ``OUT/sass-TAG.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

VOCABS = (32000, 50257, 128256, 151936, 262144)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)
ARCHS = (90, 80)
SOFTCAP = 30.0  # Gemma 2's final-logit softcap


@dataclass
class Situation:
    """A library call the launch came from (for the report)."""

    op: str
    detail: str


@dataclass
class Specialization:
    """One compiled specialization: what Triton's JIT would key its cache on."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[str, Any]
    num_warps: int
    block: int  # logit elements per loop iteration (BLOCK_V / BLOCK)
    situations: list[Situation] = field(default_factory=list)

    @property
    def key(self) -> str:
        return json.dumps(
            [self.kernel, self.signature, self.constexprs, self.attrs, self.num_warps], sort_keys=True, default=str
        )


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


# ---------------------------------------------------------------------------------------------------------------
# enumeration: the library's launch code on meta tensors
# ---------------------------------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _logits_layouts(vocab: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """``[B, T, V]`` views the log-prob op hands its kernels (``[N, V]`` inputs become ``[1, N, V]``)."""
    return [
        ("[2, 5, V] contiguous", _meta(2, 5, vocab, dtype=dtype)),
        ("[N, V] as [1, N, V]", _meta(7, vocab, dtype=dtype).unsqueeze(0)),
        ("logits[:, :-1] of [2, 6, V]", _meta(2, 6, vocab, dtype=dtype)[:, :-1]),
        ("logits[:, 1:] of [2, 6, V]", _meta(2, 6, vocab, dtype=dtype)[:, 1:]),  # base off the 16-byte grid (odd V)
        ("[3, 1, V] (T = 1)", _meta(3, 1, vocab, dtype=dtype)),
        ("permuted [V, 2, 5] (vocabulary stride != 1)", _meta(vocab, 2, 5, dtype=dtype).permute(1, 2, 0)),
    ]


def _logprob_launches() -> Iterator[tuple[Situation, Any]]:
    from fastdpo.logprobs import _backward_launch, _forward_launch, _Options, _Saved

    for vocab in VOCABS:
        for dtype in FLOATS:
            for ldt in LABEL_DTYPES:
                for name, logits3 in _logits_layouts(vocab, dtype):
                    n = logits3.shape[0] * logits3.shape[1]
                    labels = _meta(n, dtype=ldt)
                    lse, logp = _meta(n, dtype=torch.float32), _meta(n, dtype=torch.float32)
                    what = f"{str(dtype)[6:]} V={vocab} labels={str(ldt)[6:]} {name}"
                    yield (
                        Situation("token_logprobs forward", what),
                        _forward_launch(logits3, labels, lse, logp, _Options()),
                    )
                    fresh = _meta(*logits3.shape, dtype=dtype)
                    for gname, grad3 in (("in place", logits3), ("fresh grad", fresh)):
                        yield (
                            Situation("token_logprobs backward", f"{what} {gname}"),
                            _backward_launch(_Saved(logits3, labels, lse), logp, grad3, _Options()),
                        )


def _segment_launches() -> Iterator[tuple[Situation, Any]]:
    from fastdpo.segments import _segment_sum_launch

    for dtype in FLOATS:
        values = _meta(37, dtype=dtype)
        order, offsets = _meta(37, dtype=torch.int64), _meta(6, dtype=torch.int64)
        out = _meta(5, dtype=torch.float32)
        yield Situation("segment_sum", str(dtype)[6:]), _segment_sum_launch(values, order, offsets, out, 128)


def _head_launches() -> Iterator[tuple[Situation, Any]]:
    """The fused head's fold and gradient launches, from its forward and backward sweeps on CUDA-planned tiles.

    ``N = 8192`` fills a whole tile (nothing fits the keep budget: every tile is a slice of the reused buffer);
    ``N = 1`` keeps every tile (each its own contiguous ``[1, cols]`` tensor, the last one ``V mod 8192`` wide).
    """
    from fastdpo._launch import capture_launches
    from fastdpo.head.plan import DEFAULT_KEEP_LOGITS_BYTES, _plan, _Spec
    from fastdpo.head.sweeps import _backward_sweep, _forward_sweep, _Kept

    cuda = torch.device("cuda")
    d = 64  # the hidden size does not reach the kernels (they see GEMM output tiles)
    for vocab in VOCABS:
        for dtype in FLOATS:
            for ldt in LABEL_DTYPES:
                for n in (8192, 1):
                    tok, voc = _plan(n, vocab, cuda)
                    h, w, b = _meta(n, d, dtype=dtype), _meta(vocab, d, dtype=dtype), _meta(vocab, dtype=dtype)
                    labels = _meta(n, dtype=ldt)
                    for softcap in (None, SOFTCAP):
                        spec = _Spec(1.0, softcap, 1.0, tok, voc, "triton")
                        what = (
                            f"{str(dtype)[6:]} V={vocab} N={n} tiles={tok}x{voc} labels={str(ldt)[6:]} "
                            f"softcap={softcap}"
                        )
                        for stats, argmax in ((False, False), (True, False), (False, True), (True, True)):
                            kept = _Kept(DEFAULT_KEEP_LOGITS_BYTES)
                            with capture_launches() as launches:
                                st = _forward_sweep(h, w, b, labels, spec, stats, argmax, kept)
                            for kl in launches:
                                yield Situation("linear_token_logprobs", f"{what} stats={stats} argmax={argmax}"), kl
                        with capture_launches() as launches:
                            _backward_sweep(
                                h, w, b, labels, st.lse(), _meta(n, dtype=torch.float32), spec, kept, True, True, True
                            )
                        for kl in launches:
                            yield Situation("linear_token_logprobs backward", what), kl


def library_launches() -> Iterator[tuple[Situation, Any]]:
    """Every (situation, KernelLaunch) of the enumerated grid, from the library's own launch code."""
    yield from _logprob_launches()
    yield from _segment_launches()
    yield from _head_launches()


# ---------------------------------------------------------------------------------------------------------------
# specialization and ahead-of-time compile
# ---------------------------------------------------------------------------------------------------------------


def _check_compiled_mode() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the kernels are interpreted)")


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


@functools.cache
def _binder(kernel: Any):
    """Triton's own argument binder/specializer for ``kernel`` (divisibility by 16 and ``== 1`` are
    arch-independent)."""
    from triton.runtime.jit import create_function_from_signature

    _, backend = _backend(90)
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def specialize(kl: Any) -> Specialization:
    """The signature / constexprs / attributes Triton's JIT derives from this launch's actual arguments."""
    kernel = kl.kernel
    binder = _binder(kernel)
    kwargs = dict(kl.constexprs, num_warps=kl.num_warps)
    bound, spec, _ = binder(*kl.args, **kwargs)
    names = [p.name for p in kernel.params]
    signature = {k: v[0] for k, v in zip(names, spec)}
    values = list(bound.values())
    constexprs = {k: values[i] for i, k in enumerate(names) if signature[k] == "constexpr"}
    attrs = {k: v[1] for k, v in zip(names, spec) if signature[k] != "constexpr" and isinstance(v[1], str) and v[1]}
    block = int(kl.constexprs.get("BLOCK_V", kl.constexprs.get("BLOCK", 0)))
    return Specialization(kernel.__name__, signature, constexprs, attrs, kl.num_warps, block)


def enumerate_specializations() -> list[Specialization]:
    """Unique specializations of :func:`library_launches`, each with the situations that launch it."""
    _check_compiled_mode()
    found: dict[str, Specialization] = {}
    for situation, kl in library_launches():
        sp = specialize(kl)
        sp = found.setdefault(sp.key, sp)
        if len(sp.situations) < 4 or situation.op not in {s.op for s in sp.situations}:
            sp.situations.append(situation)
    return list(found.values())


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

    target, backend = _backend(arch)
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
    _check_compiled_mode()
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
# report
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


def _versions() -> dict[str, str]:
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
        "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


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
    versions = _versions()
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
