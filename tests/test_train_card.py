"""``fastdpo train``'s model card states the run's settings: its ``learning_rate`` is the peak learning rate the run
was configured with (``--lr``, or the default), not the scheduled value of the last optimizer step."""

from __future__ import annotations

import pytest

from fastdpo.train import main

FAST = (
    "--hidden-size 32 --batch-size 4 --eval-batch-size 16 --eval-batches 1 --threads 1 --no-progress --log-every 0 "
    "--eval-every 0 --warmup-steps 0 --steps 3"
).split()


@pytest.mark.parametrize(
    ("extra", "peak"), [(["--lr", "0.01", "--lr-schedule", "linear"], "0.01"), (["--lr-schedule", "cosine"], "0.003")]
)
def test_card_learning_rate_is_the_peak(tmp_path, capsys, extra, peak):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *FAST, *extra]) == 0
    capsys.readouterr()
    card = (out / "model" / "README.md").read_text()
    assert f"| learning_rate | `{peak}` |" in card
