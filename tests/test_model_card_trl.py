"""The fastdpo part of the model card ``FastDPOTrainer`` writes (:func:`fastdpo.model_card.add_fastdpo_settings`),
on TRL-shaped cards with and without their "Framework versions" section (the whole trainer's card:
``tests/test_trl_dropin.py``)."""

from __future__ import annotations

from pathlib import Path

import fastdpo
from fastdpo.model_card import add_fastdpo_settings

TRAINED = "It has been trained using [TRL](https://github.com/huggingface/trl)."
SETTINGS = {"packing": "prefix_shared", "loss_type": ["sigmoid", "sft"], "beta": 0.25, "torch_compile": False}
SECTION = (
    "### fastdpo settings\n\n"
    "- packing: `prefix_shared`\n- loss_type: `['sigmoid', 'sft']`\n- beta: `0.25`\n- torch_compile: `False`\n"
)


def test_section_goes_before_the_framework_versions(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(f"# run\n\n{TRAINED}\n\n### Framework versions\n\n- TRL: 1.16.0\n", encoding="utf-8")
    add_fastdpo_settings(card, SETTINGS)
    text = card.read_text(encoding="utf-8")
    assert TRAINED not in text
    assert "trained using [TRL](https://github.com/huggingface/trl) with fastdpo's DPO engine" in text
    assert f"{SECTION}\n### Framework versions\n\n- fastdpo: {fastdpo.__version__}\n- TRL: 1.16.0\n" in text
    assert text.count("### fastdpo settings") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # written in place, no temporary left behind


def test_section_goes_at_the_end_of_a_card_without_versions(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text("# run\n\nNo TRL sentence here.\n\n\n", encoding="utf-8")
    add_fastdpo_settings(str(card), SETTINGS)
    assert card.read_text(encoding="utf-8") == f"# run\n\nNo TRL sentence here.\n\n{SECTION}"
