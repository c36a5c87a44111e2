"""``fastdpo memory`` defaults (issue 18, item 8): a representative DPO setup with every fastdpo option beside TRL and
naive, each option's saving where it comes from, estimates against measured CPU steps of the options, ``--plot``."""

from __future__ import annotations

import json
import struct

import pytest
from helpers import measure_matches_estimate

from fastdpo import memory as M
from fastdpo import memory_cli

GIB = 2**30


def test_defaults_show_a_representative_setup_and_every_option(capsys):
    assert memory_cli.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["name"] == "Llama-3-8B"
    step = report["step"]
    assert (
        step["pairs"],
        step["prompt_len"],
        step["completion_len"],
        step["dtype"],
        step["optimizer"],
        step["reference"],
        step["device"],
    ) == (4, 512, 512, "bf16", "adamw", "model", "cuda")
    e = report["estimates"]
    assert list(e) == list(M.VARIANTS)
    for v in e.values():
        assert sum(v["peak_parts"].values()) == v["peak"] == max(v["phases"].values())
    # where each saving comes from
    assert e["naive"]["logits"] > 3 * e["trl"]["logits"]  # naive materializes [tokens, V] logits
    assert e["fastdpo+prefix_shared"]["activations"] < 0.85 * e["fastdpo"]["activations"]  # prompt once per pair
    assert e["fastdpo+precomputed_ref"]["reference"] == 0 < e["fastdpo"]["reference"]  # no reference weights
    assert e["fastdpo+grad_in_forward"]["logits_saved"] != e["fastdpo"]["logits_saved"]
    assert e["fastdpo+all"]["peak"] < min(e[v]["peak"] for v in M.VARIANTS if v != "fastdpo+all")
    assert e["fastdpo+all"]["peak"] < e["trl"]["peak"] - 20 * GIB
    assert e["naive"]["peak"] > e["trl"]["peak"]


def test_table_shows_the_difference_to_trl(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")  # rich sizes the table to the terminal
    assert memory_cli.main([]) == 0
    out = capsys.readouterr().out
    assert "Llama-3-8B" in out and "peak vs trl" in out and "+ precomputed_ref" in out


@pytest.mark.parametrize("dtype", ["fp32"])
def test_option_estimates_match_measured_steps(monkeypatch, dtype):
    """``--measure`` of the fastdpo options on a scaled-down Llama (2 layers, V 32000): the real DPOEngine step with
    grad_in_forward, with everything (prefix_shared + grad_in_forward + precomputed reference), and the head with a
    precomputed reference; peak RSS over the baseline within the estimator's 10 %."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    step = M.StepConfig(
        pairs=4, prompt_len=192, completion_len=64, dtype=dtype, optimizer="adamw", reference="model", device="cpu"
    )
    variants = ["fastdpo+grad_in_forward", "fastdpo+precomputed_ref", "fastdpo+all"]
    measure_matches_estimate(step, variants, rel=0.1)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mem.png"
    assert memory_cli.main(["--plot", str(png)]) == 0
    assert f"plot written to {png}" in capsys.readouterr().out
    width, height = _png_size(png)
    assert width > 600 and height > 300
    assert [p.name for p in tmp_path.iterdir()] == ["mem.png"]  # written atomically, nothing else left


def test_plot_bad_paths(tmp_path, capsys):
    from fastdpo.cli import main as cli_main

    for bad in (str(tmp_path / "x.jpg"), str(tmp_path), str(tmp_path / "no" / "x.png")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli_main(["memory", "--plot", bad])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exc.value.code == 2 and len(err) == 1 and "--plot" in err[0], (bad, err)
