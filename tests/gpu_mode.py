"""Which way this pytest run executes the Triton kernels (used by ``tests/conftest.py``; no side effects on import).

* The plain suite (``pytest -n 2 tests``): Triton runs through the interpreter (``TRITON_INTERPRET=1``), so the
  ``backend="triton"`` tests can feed the kernels CPU tensors; tests marked ``gpu`` are skipped here (they are run
  compiled by the GPU mode).
* The GPU mode (``pytest -m gpu``, or any ``-m`` expression that selects gpu-marked tests only): the interpreter is
  off (``TRITON_INTERPRET=0``), every ``gpu`` test runs its kernels compiled on CUDA, and skips without CUDA.

Triton decides between its interpreter and the compiler when ``@triton.jit`` decorates a kernel (``triton.jit`` reads
``triton.knobs.runtime.interpret``, i.e. ``os.environ["TRITON_INTERPRET"]``, at decoration time: triton 3.9
``runtime/jit.py``), that is when ``fastdpo.kernels`` is imported; fastdpo's dispatch reads the variable at each call.
So the variable must be set before test collection imports fastdpo -- ``pytest_configure`` is that point (importing
``torch`` imports ``triton`` itself, but no kernel is decorated then).
"""

from __future__ import annotations

import itertools
import re

from _pytest.mark.expression import Expression

MARKER = "gpu"
_KEYWORDS = {"and", "or", "not"}


def selects_only_gpu(markexpr: str | None) -> bool:
    """True when the ``-m`` expression selects some gpu-marked test and no test without the ``gpu`` marker.

    Exact over the marker names the expression mentions: with ``gpu`` absent, no combination of the other markers
    may be selected (``"gpu"``, ``"gpu and not distributed"`` -> True; ``"not gpu"``, ``"gpu or slow"``, ``""`` ->
    False)."""
    if not markexpr or not markexpr.strip():
        return False
    expr = Expression.compile(markexpr)
    names = sorted(set(re.findall(r"[A-Za-z_][\w.+-]*", markexpr)) - _KEYWORDS)
    if MARKER not in names:
        return False
    some_gpu = False
    for bits in itertools.product((False, True), repeat=len(names)):
        on = {n for n, b in zip(names, bits) if b}
        if expr.evaluate(lambda name, **kwargs: name in on):
            if MARKER not in on:
                return False  # a test without the gpu marker would be selected
            some_gpu = True
    return some_gpu


def triton_interpret_value(gpu_mode: bool) -> str:
    """``TRITON_INTERPRET`` for the run: ``"0"`` (compiled kernels) in the GPU mode, ``"1"`` (interpreter) otherwise."""
    return "0" if gpu_mode else "1"


SKIP_NOT_GPU_MODE = "gpu test: runs with compiled kernels under `pytest -m gpu` (this run interprets Triton)"
SKIP_NO_CUDA = "gpu test: needs CUDA (none available)"
