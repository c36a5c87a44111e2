"""Package layout: ``kernels/`` ships only as ``fastdpo.kernels``; the ``fastdpo`` command answers ``--help``.

A top-level ``kernels`` module must never be importable: transformers and bitsandbytes probe that name (the
Hugging Face ``kernels`` hub package) and would pick up this repository's directory instead.
"""

from __future__ import annotations

import importlib
import importlib.util

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
