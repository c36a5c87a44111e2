"""``fastdpo.engine`` after its split: the names users import from it still resolve, to the split modules' objects."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("REFERENCE_MODES", "fastdpo.engine_reference"),
        ("MetricGather", "fastdpo.engine_loss"),
        ("token_metrics", "fastdpo.engine_loss"),
        ("token_metric_totals", "fastdpo.engine_loss"),
    ],
)
def test_old_engine_names_resolve_to_their_new_home(name: str, home: str) -> None:
    engine = importlib.import_module("fastdpo.engine")
    assert name in engine.__all__
    assert getattr(engine, name) is getattr(importlib.import_module(home), name)


def test_engine_class_stays_in_fastdpo_engine() -> None:
    from fastdpo.engine import REFERENCE_MODES, DPOEngine

    assert DPOEngine.__module__ == "fastdpo.engine"
    assert REFERENCE_MODES == ("model", "adapter", "precomputed")
