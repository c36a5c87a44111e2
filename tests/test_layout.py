"""Package layout: ``kernels/`` ships only as ``fastdpo.kernels``; the ``fastdpo`` command answers ``--help``.

A top-level ``kernels`` module must never be importable: transformers and bitsandbytes probe that name (the
Hugging Face ``kernels`` hub package) and would pick up this repository's directory instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_top_level_kernels_is_not_importable() -> None:
    assert importlib.util.find_spec("kernels") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kernels")


def test_kernels_import_as_fastdpo_kernels() -> None:
    pkg = importlib.import_module("fastdpo.kernels")
    assert pkg.__name__ == "fastdpo.kernels"
    for name, kernel in (("logprobs", "logprobs_fwd_kernel"), ("segment_sum", "segment_sum_kernel")):
        module = importlib.import_module(f"fastdpo.kernels.{name}")
        assert hasattr(module, kernel)
        assert module.__file__ is not None and module.__file__.startswith(pkg.__path__[0])


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    from fastdpo.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("bench", "memory", "train"):
        assert command in text


def test_public_names_are_the_readmes_and_import_stays_cheap() -> None:
    """``fastdpo.__all__`` is what the README shows; ``import fastdpo`` loads neither torch nor transformers; every
    public name resolves (and is then a real object, not a lazy stub)."""
    code = ("import sys, fastdpo; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(heavy, sorted(fastdpo.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("[] "), out
    import fastdpo

    readme = (Path(fastdpo.__file__).resolve().parent.parent / "README.md").read_text()
    for name in fastdpo.__all__:
        if name != "__version__":
            assert f"fastdpo.{name}" in readme or re.search(rf"\b{name}\b", readme), name
            assert getattr(fastdpo, name) is not None
    assert fastdpo.DPOEngine.__module__ == "fastdpo.engine"


def test_moved_names_warn_and_resolve() -> None:
    import fastdpo
    import fastdpo.losses
    import fastdpo.reference

    with pytest.warns(DeprecationWarning, match="import it from fastdpo.losses"):
        assert fastdpo.simpo_loss is fastdpo.losses.simpo_loss
    with pytest.warns(DeprecationWarning, match="fastdpo.reference"):
        assert fastdpo.naive_sequence_logprobs is fastdpo.reference.naive_sequence_logprobs
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastdpo.nope  # noqa: B018
