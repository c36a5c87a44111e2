"""Every Triton kernel specialization fastdpo launches, enumerated without a GPU (the input of
:mod:`fastdpo.benchmarks.sass_compile` and :mod:`fastdpo.benchmarks.sass_report`).

The launches are produced by the library's own launch code (``fastdpo._launch.KernelLaunch`` built by
``_forward_launch`` / ``_fold_launch`` / ...) on ``meta`` tensors, for float32/bfloat16/float16 inputs, int32/int64
labels, every constexpr flag and the tile and block sizes the CUDA planner picks for ``V`` in {32000, 50257, 128256,
151936, 262144}. Each launch is specialized exactly as Triton's JIT would (``create_function_from_signature`` on the
real arguments: dtypes, 16-divisibility and ``== 1`` of integers and pointers) and deduplicated: a
:class:`Specialization` is what Triton's cache keys a compiled kernel on, with the library calls (:class:`Situation`)
that launch it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

VOCABS = (32000, 50257, 128256, 151936, 262144)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)
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
# specialization
# ---------------------------------------------------------------------------------------------------------------


def check_compiled_mode() -> None:
    """``RuntimeError`` when ``TRITON_INTERPRET=1`` (the kernels were decorated for the interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the kernels are interpreted)")


def cuda_backend(arch: int) -> tuple[Any, Any]:
    """Triton's ``(GPUTarget, backend)`` of ``sm_<arch>`` (32-thread warps): no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


@functools.cache
def _binder(kernel: Any):
    """Triton's own argument binder/specializer for ``kernel`` (divisibility by 16 and ``== 1`` are
    arch-independent)."""
    from triton.runtime.jit import create_function_from_signature

    _, backend = cuda_backend(90)
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
    check_compiled_mode()
    found: dict[str, Specialization] = {}
    for situation, kl in library_launches():
        sp = specialize(kl)
        sp = found.setdefault(sp.key, sp)
        if len(sp.situations) < 4 or situation.op not in {s.op for s in sp.situations}:
            sp.situations.append(situation)
    return list(found.values())
