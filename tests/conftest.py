"""Test configuration: two ways to run the Triton kernels, picked from the command line (see ``tests/gpu_mode.py``).

* ``pytest -n 2 tests`` (the plain suite, any machine): ``TRITON_INTERPRET=1``, Triton kernels run through the
  interpreter on CPU tensors; tests marked ``gpu`` are skipped.
* ``pytest -m gpu`` (a CUDA machine): ``TRITON_INTERPRET=0``, only the ``gpu`` tests run, with compiled kernels on
  CUDA; without CUDA they skip with that reason.

``pytest_configure`` sets the variable before collection imports ``fastdpo.kernels`` (where ``@triton.jit`` reads it).
"""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory (the repository root) first on sys.path, which would make `kernels/`
# importable as a top-level module; the suite tests the installed layout (`fastdpo.kernels` only) however it is
# launched.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Test helpers in this folder (backends.py, gpu_mode.py, the distributed workers) are imported by name:
# --import-mode=importlib does not put the tests directory on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))

from collections.abc import Iterator  # noqa: E402

import gpu_mode  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

_GPU_MODE = False


def pytest_configure(config: pytest.Config) -> None:
    global _GPU_MODE
    _GPU_MODE = gpu_mode.selects_only_gpu(config.getoption("markexpr", ""))
    early = sorted(m for m in sys.modules if m.startswith("fastdpo.kernels"))
    if early:  # the kernels were decorated before the mode was known: they would not follow TRITON_INTERPRET
        raise pytest.UsageError(f"{early} imported before tests/conftest.py set TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = gpu_mode.triton_interpret_value(_GPU_MODE)


def pytest_report_header(config: pytest.Config) -> str:
    import importlib

    kinds = set()
    for name in ("logprobs", "linear_fold", "segment_sum"):
        try:
            module = importlib.import_module(f"fastdpo.kernels.{name}")
        except ImportError:
            continue
        kinds |= {
            type(v).__name__
            for v in vars(module).values()
            if type(v).__name__ in ("JITFunction", "InterpretedFunction")
        }
    mode = "gpu (-m gpu)" if _GPU_MODE else "plain"
    return (
        f"fastdpo test mode: {mode}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}; "
        f"kernels: {','.join(sorted(kinds)) or 'none'}; CUDA available: {torch.cuda.is_available()}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if not _GPU_MODE:
        reason = gpu_mode.SKIP_NOT_GPU_MODE
    elif not torch.cuda.is_available():
        reason = gpu_mode.SKIP_NO_CUDA
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker(gpu_mode.MARKER) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny-model ops run several times faster on one intra-op thread (no OpenMP hand-offs on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
