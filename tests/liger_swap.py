"""pytest plugin: run Liger-Kernel 0.8.5's own ``test/chunked_loss`` preference-loss tests against fastdpo.

Loaded with ``-p liger_swap`` (``tests/`` on ``PYTHONPATH``) by ``tests/liger_suite.py``; nothing of Liger's code is
copied into this repository. Before Liger's test modules are imported, every Liger name they import from
``liger_kernel.chunked_loss`` (the modules, the ``*Function`` classes and the ``liger_fused_linear_*`` functions of
``liger_kernel.chunked_loss.functional``) is rebound to fastdpo's counterpart (:data:`SWAP`), so
``from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss`` in a Liger test yields
:class:`fastdpo.nn.FusedLinearDPOLoss`. Liger's reference implementations (``test/utils.py``: HF-style losses
computing logits in full) stay Liger's, so every test compares fastdpo against Liger's own oracle.

After collection the plugin checks that each collected test module really holds fastdpo's objects under the Liger
names (a run that silently tested Liger itself fails here), then:

* scales the largest shape of the parametrized tests, ``(B, T, H, V) = (8, 128, 1024, 4096)``, down to
  :data:`SCALED_SHAPE` (a 2-core CPU runs the rest of the matrix in minutes; the small and odd shapes
  ``(3, 47, 31, 123)`` and ``(2, 2, 8, 8)`` run as written; test ids keep Liger's values).

Every test then runs as Liger wrote it. (The ``sppo_hard`` cases of ``test_correctness_functional_apo_loss_types``
compare the functional path with the module at ``atol=1e-5`` on losses of ~1e4; with both names resolved to fastdpo
they agree exactly. With only one of them swapped -- Liger's function against fastdpo's module -- two float32
implementations are compared on that ill-conditioned loss, equally far from float64:
``tests/test_liger_suite.py::test_sppo_hard_cross_implementation_is_ill_conditioned`` measures it.)
"""

from __future__ import annotations

import importlib

import pytest

#: Liger module -> {Liger name: "fastdpo.module:name"}
SWAP: dict[str, dict[str, str]] = {
    "liger_kernel.chunked_loss": {
        "LigerFusedLinearDPOLoss": "fastdpo.nn:FusedLinearDPOLoss",
        "LigerFusedLinearCPOLoss": "fastdpo.nn:FusedLinearCPOLoss",
        "LigerFusedLinearORPOLoss": "fastdpo.nn:FusedLinearORPOLoss",
        "LigerFusedLinearSimPOLoss": "fastdpo.nn:FusedLinearSimPOLoss",
        "LigerFusedLinearKTOLoss": "fastdpo.fused_kto:FusedLinearKTOLoss",
    },
    "liger_kernel.chunked_loss.dpo_loss": {
        "LigerFusedLinearDPOLoss": "fastdpo.nn:FusedLinearDPOLoss",
        "LigerFusedLinearDPOFunction": "fastdpo.functional:FusedLinearDPOFunction",
    },
    "liger_kernel.chunked_loss.cpo_loss": {
        "LigerFusedLinearCPOLoss": "fastdpo.nn:FusedLinearCPOLoss",
        "LigerFusedLinearCPOFunction": "fastdpo.functional:FusedLinearCPOFunction",
    },
    "liger_kernel.chunked_loss.orpo_loss": {
        "LigerFusedLinearORPOLoss": "fastdpo.nn:FusedLinearORPOLoss",
        "LigerFusedLinearORPOFunction": "fastdpo.functional:FusedLinearORPOFunction",
    },
    "liger_kernel.chunked_loss.simpo_loss": {
        "LigerFusedLinearSimPOLoss": "fastdpo.nn:FusedLinearSimPOLoss",
        "LigerFusedLinearSimPOFunction": "fastdpo.functional:FusedLinearSimPOFunction",
    },
    "liger_kernel.chunked_loss.kto_loss": {
        "LigerFusedLinearKTOLoss": "fastdpo.fused_kto:FusedLinearKTOLoss",
        "LigerFusedLinearKTOFunction": "fastdpo.functional:FusedLinearKTOFunction",
    },
    "liger_kernel.chunked_loss.functional": {
        "liger_fused_linear_dpo": "fastdpo.functional:fused_linear_dpo",
        "liger_fused_linear_cpo": "fastdpo.functional:fused_linear_cpo",
        "liger_fused_linear_orpo": "fastdpo.functional:fused_linear_orpo",
        "liger_fused_linear_simpo": "fastdpo.functional:fused_linear_simpo",
        "liger_fused_linear_kto": "fastdpo.functional:fused_linear_kto",
    },
}

#: Liger's test files this plugin swaps (the preference losses; GRPO, JSD and cosine have no fastdpo counterpart)
TEST_FILES = ("test_dpo_loss.py", "test_cpo_loss.py", "test_orpo_loss.py", "test_simpo_loss.py", "test_kto_loss.py")

LARGE_SHAPE = (8, 128, 1024, 4096)
SCALED_SHAPE = (8, 32, 128, 512)
_SHAPE_KEYS = ("B", "T", "H", "V")


def _resolve(spec: str) -> object:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def pytest_configure(config: pytest.Config) -> None:
    for module_name, names in SWAP.items():
        module = importlib.import_module(module_name)
        for liger_name, spec in names.items():
            if not hasattr(module, liger_name):
                raise pytest.UsageError(f"liger_swap: {module_name} has no {liger_name} (not Liger 0.8.5?)")
            setattr(module, liger_name, _resolve(spec))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    swapped = {name: _resolve(spec) for names in SWAP.values() for name, spec in names.items()}
    checked: set[str] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in checked:
            checked.add(module.__name__)
            for name, ours in swapped.items():
                if hasattr(module, name) and getattr(module, name) is not ours:
                    raise pytest.UsageError(f"liger_swap: {module.__name__}.{name} is not fastdpo's ({ours!r})")
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        if (
            all(k in callspec.params for k in _SHAPE_KEYS)
            and tuple(callspec.params[k] for k in _SHAPE_KEYS) == LARGE_SHAPE
        ):
            callspec.params.update(zip(_SHAPE_KEYS, SCALED_SHAPE))
