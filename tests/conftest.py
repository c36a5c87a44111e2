"""Test configuration: Triton kernels run through the interpreter on CPU machines.

``TRITON_INTERPRET`` must be set before triton is first imported; set ``FASTDPO_GPU_TESTS=1`` on a CUDA machine to
compile the kernels for the GPU instead.
"""
import os

if os.environ.get("FASTDPO_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

# `python -m pytest` puts the working directory (the repository root) first on sys.path, which would make `kernels/`
# importable as a top-level module; the suite tests the installed layout (`fastdpo.kernels` only) however it is launched.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Shared offline fixtures (tests/tiny.py) are imported as `import tiny` from every test file: --import-mode=importlib
# does not put the tests directory on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny-model ops run several times faster on one intra-op thread (no OpenMP hand-offs on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
