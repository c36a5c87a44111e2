"""Backend choice: Triton kernels on CUDA, the pure-PyTorch path elsewhere.

``backend="auto"`` picks Triton for CUDA tensors when Triton imports. ``backend="triton"`` forces the kernels (on CPU
this needs ``TRITON_INTERPRET=1``, which is how the test-suite runs them); ``backend="torch"`` forces the torch path.
The environment variable ``FASTDPO_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTDPO_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: Backend, device: torch.device) -> Literal["triton", "torch"]:
    """Return the concrete backend for tensors on ``device``; raise ``ValueError`` if impossible.

    ``"auto"`` reads ``FASTDPO_BACKEND`` (``auto``/``triton``/``torch``; unset or empty means ``auto``) at every call;
    any other value raises ``ValueError`` naming the variable, as does ``FASTDPO_BACKEND=triton`` where Triton cannot
    run.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    source = f"backend={backend!r}"
    if backend == "auto":
        env = os.environ.get(ENV_VAR) or "auto"
        if env not in _BACKENDS:
            raise ValueError(
                f"environment variable {ENV_VAR} must be 'auto', 'triton' or 'torch' (or unset), got {env!r}"
            )
        if env == "auto":
            return "triton" if device.type == "cuda" and triton_available() else "torch"
        backend, source = env, f"{ENV_VAR}={env}"  # type: ignore[assignment]
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{source} but triton is not installed (pip install 'fastdpo[triton]')")
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(f"{source} needs CUDA tensors or TRITON_INTERPRET=1, got device {device}")
        return "triton"
    return "torch"
