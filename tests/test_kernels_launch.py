"""Every Triton launch goes through ``fastdpo._launch.launch`` and runs inside ``device_guard(<tensors' device>)``.

A kernel launched on the current CUDA device with another device's pointers (a model on ``cuda:1``) reads foreign
memory; the guard makes the tensors' device current. On CPU the guard is a no-op, so these tests check the routing:
each kernel of ``fastdpo.kernels`` is wrapped so that a launch outside the (recording) guard, or under a guard for a
different device, fails — while every op runs on the interpreter.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fastdpo._launch as launch_mod
import fastdpo.kernels.linear_fold as k_fold
import fastdpo.kernels.logprobs as k_logprobs
import fastdpo.kernels.segment_sum as k_segment
from fastdpo import linear_token_logprobs, sequence_logprobs
from fastdpo._launch import KernelLaunch, capture_launches, device_guard
from fastdpo.head.grad_in_forward import linear_logprobs_loss_grad_in_forward

pytestmark = pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels through the Triton interpreter"
)

KERNEL_MODULES = (k_logprobs, k_fold, k_segment)


def _kernel_names(module: Any) -> list[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")]


def test_device_guard_is_the_tensors_device() -> None:
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("meta")), contextlib.nullcontext)
    guard = device_guard(torch.device("cuda", 1))  # built without entering: no CUDA needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    guard3 = device_guard(torch.device("cuda:3"))
    assert isinstance(guard3, torch.cuda.device) and guard3.idx == 3


def test_capture_records_instead_of_launching() -> None:
    calls: list[Any] = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    spec = KernelLaunch(Kernel(), (3,), (1, 2), {"BLOCK": 4}, 2, torch.device("cpu"))
    with capture_launches() as got:
        launch_mod.launch(spec)
    assert got == [spec] and calls == []
    launch_mod.launch(spec)
    assert calls == [((3,), (1, 2), {"BLOCK": 4, "num_warps": 2})]


class _Recorder:
    """Replaces ``device_guard``; kernel proxies check that a launch happens inside it, for the right device."""

    def __init__(self) -> None:
        self.active: torch.device | None = None
        self.launched: dict[str, int] = {}

    @contextlib.contextmanager
    def guard(self, device: torch.device) -> Iterator[None]:
        assert self.active is None, "nested device guards"
        self.active = device
        try:
            yield
        finally:
            self.active = None

    def proxy(self, name: str, kernel: Any) -> Any:
        recorder = self

        class Proxy:
            def __getitem__(self, grid):
                def run(*args: Any, **kwargs: Any) -> Any:
                    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                    assert recorder.active is not None, f"{name} launched outside device_guard"
                    assert devices == {recorder.active}, (name, devices, recorder.active)
                    recorder.launched[name] = recorder.launched.get(name, 0) + 1
                    return kernel[grid](*args, **kwargs)

                return run

        return Proxy()


def test_every_launch_site_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(launch_mod, "device_guard", rec.guard)
    names = []
    for module in KERNEL_MODULES:
        for name in _kernel_names(module):
            names.append(name)
            monkeypatch.setattr(module, name, rec.proxy(name, getattr(module, name)))

    gen = torch.Generator().manual_seed(0)
    # log-probs from logits (forward, backward) and the packed layout's segment sum
    logits = torch.randn(2, 3, 37, generator=gen, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3), generator=gen)
    sequence_logprobs(logits, labels, backend="triton").sum().backward()
    flat = torch.randn(6, 37, generator=gen, requires_grad=True)
    seg = torch.tensor([0, 0, 1, 1, 1, 2])
    sequence_logprobs(flat, labels.reshape(-1), segment_ids=seg, backend="triton").sum().backward()
    # fused head: fold (stats, argmax, softcap) and gradient kernels; grad-in-forward
    hidden = torch.randn(5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(37, 8, generator=gen, requires_grad=True)
    lab = torch.randint(0, 37, (5,), generator=gen)
    out = linear_token_logprobs(
        hidden,
        weight,
        lab,
        softcap=5.0,
        return_entropy=True,
        return_argmax_hit=True,
        token_tile=4,
        vocab_tile=16,
        backend="triton",
    )
    out.logprobs.sum().backward()
    loss, _ = linear_logprobs_loss_grad_in_forward(
        hidden, weight, lab, torch.tensor([0, 0, 1, 1, 1]), 2, lambda s, ids: s.sum(), backend="triton"
    )
    loss.backward()
    assert set(rec.launched) == set(names), (rec.launched, names)
