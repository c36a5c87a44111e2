"""Backends of the kernel entry points for parametrized tests (``from backends import BACKENDS``).

The Triton cases run the kernels on CPU tensors through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
except under `pytest -m gpu`, where CPU tensors cannot reach a compiled kernel), and are reported as skipped where
that is impossible. The offline model/tokenizer fixtures are in :mod:`fastdpo.tiny`.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
            reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1",
        ),
    ),
]
