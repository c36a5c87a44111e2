"""Triton kernel launches: one description per launch, one guarded launch function.

Every Triton launch in fastdpo is built as a :class:`KernelLaunch` by a pure function of its tensors (grid, arguments,
constexprs, ``num_warps``) and run by :func:`launch`, which enters :func:`device_guard` for the tensors' device first:
a kernel launched on the *current* CUDA device with another device's pointers (a model on ``cuda:1``) would read
foreign memory. The same descriptions drive the ahead-of-time compile gate and the SASS report
(``fastdpo.benchmarks.sass_report``), which collect them with :func:`capture_launches` on ``meta`` tensors instead of
running them, so the gate compiles exactly what the library launches.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch


class KernelLaunch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)`` on ``device``."""

    kernel: Any  # triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    num_warps: int
    device: torch.device


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


def launch(spec: KernelLaunch) -> None:
    """Run ``spec`` with its device current (or record it inside :func:`capture_launches`)."""
    if _captured is not None:
        _captured.append(spec)
        return
    with device_guard(spec.device):
        spec.kernel[spec.grid](*spec.args, **spec.constexprs, num_warps=spec.num_warps)
