"""Triton kernel launches: one description per launch, one guarded launch function.

Every Triton launch in fastdpo is built as a :class:`KernelLaunch` by a pure function of its tensors (grid, arguments,
constexprs, ``num_warps``) and run by :func:`launch`, which enters :func:`device_guard` for the tensors' device first:
a kernel launched on the *current* CUDA device with another device's pointers (a model on ``cuda:1``) would read
foreign memory. The same descriptions drive the ahead-of-time compile gate and the SASS report
(``fastdpo.benchmarks.sass_specs``), which collect them with :func:`capture_launches` on ``meta`` tensors instead of
running them, so the gate compiles exactly what the library launches.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from fastdpo._dispatch import interpreter_on


class KernelLaunch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)`` on ``device``."""

    kernel: Any  # triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    num_warps: int
    device: torch.device


def aligned_base(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(base, offset)``: ``t``'s first element is element ``offset`` of ``base``, a one-element view of the same
    storage that starts on the 16-byte boundary at or below ``t.data_ptr()``.

    Triton specializes a kernel on its pointers' 16-byte alignment; a view such as ``logits[:, k:]`` would otherwise
    compile the scalar (non-vector) variant for the whole tensor. Kernels add ``offset`` to their element offsets.
    When the storage itself is not aligned, ``(t, 0)``.
    """
    size = t.element_size()
    delta = (t.data_ptr() % 16) // size
    if delta == 0 or t.data_ptr() % size or t.storage_offset() < delta:
        return t, 0
    return t.as_strided((1,), (1,), t.storage_offset() - delta), delta


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current for a launch: ``torch.cuda.device(device)`` on CUDA, a no-op elsewhere (CPU, meta)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_captured: list[KernelLaunch] | None = None


@contextlib.contextmanager
def capture_launches() -> Iterator[list[KernelLaunch]]:
    """Inside this context :func:`launch` records launches into the yielded list instead of running them."""
    global _captured
    before, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = before


@functools.cache
def _interpreter_rounds_bf16_to_nearest() -> None:
    """Make the Triton interpreter round fp32 -> bf16 to nearest even, as the GPU's ``cvt.rn.bf16.f32`` does.

    The interpreter (``TRITON_INTERPRET=1``) truncates that conversion, doubling the rounding error of every bf16
    value a kernel stores (the log-prob gradient, the fused head's logit-gradient tile) compared with the compiled
    kernel; the CPU tests would then check numerics the GPU never produces. Installed once, only when the
    interpreter runs a fastdpo kernel; other conversions are left to the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncate = builder.create_fp_trunc

    def create_fp_trunc(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncate(self, src, dst_type)

    builder.create_fp_trunc = create_fp_trunc


def launch(spec: KernelLaunch) -> None:
    """Run ``spec`` with its device current (or record it inside :func:`capture_launches`)."""
    if _captured is not None:
        _captured.append(spec)
        return
    if interpreter_on():
        _interpreter_rounds_bf16_to_nearest()
    with device_guard(spec.device):
        spec.kernel[spec.grid](*spec.args, **spec.constexprs, num_warps=spec.num_warps)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): Triton block widths are powers of two."""
    return 1 << max(0, (n - 1).bit_length())
