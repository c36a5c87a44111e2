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
    code = (
        "import sys, fastdpo; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(heavy, sorted(fastdpo.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("[] "), out
    import fastdpo

    readme = (Path(fastdpo.__file__).resolve().parent.parent / "README.md").read_text()
    for name in fastdpo.__all__:
        if name != "__version__":
            assert f"fastdpo.{name}" in readme or re.search(rf"\b{name}\b", readme), name
            assert getattr(fastdpo, name) is not None
    assert fastdpo.DPOEngine.__module__ == "fastdpo.engine"
    assert sorted(fastdpo._EXPORTS) == sorted(n for n in fastdpo.__all__ if n != "__version__")


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


# The README's architecture table, bottom up: a module imports only from its own layer and the ones before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("fastdpo.kernels",)),
    (
        "foundations",
        (
            "fastdpo._launch",
            "fastdpo._dispatch",
            "fastdpo._dtypes",
            "fastdpo._validation",
            "fastdpo._deprecation",
            "fastdpo.atomic",
        ),
    ),
    ("ops", ("fastdpo.logprobs", "fastdpo.segments")),
    ("fused head", ("fastdpo.head", "fastdpo.linear_logprobs")),
    ("losses", ("fastdpo.losses",)),
    ("attention and sequence parallelism", ("fastdpo.attention", "fastdpo.ulysses", "fastdpo.sequence_parallel")),
    (
        "engine",
        (
            "fastdpo.models",
            "fastdpo.collator",
            "fastdpo.engine",
            "fastdpo.engine_inputs",
            "fastdpo.engine_reference",
            "fastdpo.engine_loss",
            "fastdpo.ref_cache",
            "fastdpo.quantize",
        ),
    ),
    (
        "drop-ins",
        (
            "fastdpo.dpo_loss",
            "fastdpo.fused_base",
            "fastdpo.nn",
            "fastdpo.fused_kto",
            "fastdpo.functional",
            "fastdpo.integrations",
            "fastdpo.model_card",
        ),
    ),
    ("references and fixtures", ("fastdpo.reference", "fastdpo.tiny")),
    (
        "commands",
        (
            "fastdpo.cli",
            "fastdpo.train",
            "fastdpo.train_args",
            "fastdpo.train_setup",
            "fastdpo.train_loop",
            "fastdpo.run_state",
            "fastdpo.train_parallel",
            "fastdpo.data",
            "fastdpo.model_shape",
            "fastdpo.memory",
            "fastdpo.sp_memory",
            "fastdpo.memory_cli",
        ),
    ),
    ("benchmarks", ("fastdpo.benchmarks",)),
]
# the README's two exceptions: old import paths re-exporting the oracles, and --measure's lazy import of its workers
ALLOWED_UPWARD = {
    ("fastdpo.logprobs", "fastdpo.reference"),
    ("fastdpo.linear_logprobs", "fastdpo.reference"),
    ("fastdpo.memory_cli", "fastdpo.benchmarks.memory_measure"),
}


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_every_module_is_in_one_layer_and_imports_only_downward() -> None:
    """Every module of the package belongs to a layer of the README's architecture table, and its imports of
    fastdpo modules (top level or inside functions) go to its own layer or below, except the README's exceptions."""
    import ast

    import fastdpo

    pkg = Path(fastdpo.__file__).resolve().parent
    root = pkg.parent
    files = {
        f"fastdpo.{'.'.join(p.relative_to(pkg).with_suffix('').parts)}".removesuffix(".__init__"): p
        for p in pkg.rglob("*.py")
    }
    files.update({f"fastdpo.kernels.{p.stem}".removesuffix(".__init__"): p for p in (root / "kernels").glob("*.py")})
    files.update(
        {f"fastdpo.benchmarks.{p.stem}".removesuffix(".__init__"): p for p in (root / "benchmarks").glob("*.py")}
    )
    unplaced = sorted(m for m in files if m != "fastdpo" and _layer(m) is None)
    assert not unplaced, f"modules missing from the architecture table: {unplaced}"
    upward = []
    for module, path in files.items():
        own = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdpo"):
                targets = [f"fastdpo.{a.name}" for a in node.names] if node.module == "fastdpo" else [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("fastdpo")]
            else:
                continue
            for target in targets:
                layer = _layer(target)
                if own is not None and layer is not None and layer > own and (module, target) not in ALLOWED_UPWARD:
                    upward.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer][0]})")
    assert not upward, upward


def test_every_package_directory_is_installed() -> None:
    """``[tool.setuptools] packages`` is an explicit list (``kernels/`` and ``benchmarks/`` are mapped into the
    package): every folder of ``fastdpo/`` with an ``__init__.py`` must be in it, or a wheel ships without it."""
    import fastdpo

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pkg = Path(fastdpo.__file__).resolve().parent
    listed = set(tomllib.loads((pkg.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("fastdpo", *p.parent.relative_to(pkg).parts)) for p in pkg.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert {"fastdpo.kernels", "fastdpo.benchmarks"} <= listed


def test_the_package_is_marked_typed() -> None:
    """PEP 561: ``fastdpo/py.typed`` exists and is shipped as package data, so type checkers read the installed
    package's annotations (the ``Unpack[...]``-typed ``**options`` of the public functions among them) instead of
    treating it as untyped."""
    import fastdpo

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pkg = Path(fastdpo.__file__).resolve().parent
    assert (pkg / "py.typed").is_file()
    package_data = tomllib.loads((pkg.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["fastdpo"]
