"""``fastdpo train`` as a real DPO job (issue 18, item 7): LoRA and QLoRA adapters loadable with peft, gradient
accumulation, TensorBoard, torchrun data parallelism (2 gloo processes against one process), truncation mode, every
packing, loss mixtures, the model card, resume of a LoRA run, and the new arguments' usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import metrics_records
from launch import needs_gloo

from fastdpo.train import main

pytest.importorskip("peft")

FAST = (
    "--hidden-size 32 --eval-batch-size 16 --threads 1 --no-progress --log-every 0 --eval-every 0 --warmup-steps 0"
).split()

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, *args: str, steps: int = 3, batch_size: int = 4) -> int:
    """``fastdpo train`` into ``out`` for ``steps`` steps of ``batch_size`` pairs with ``args`` and :data:`FAST`."""
    return main(["--output-dir", str(out), "--steps", str(steps), "--batch-size", str(batch_size), *args, *FAST])


def _steps(out: Path) -> list[dict]:
    return [r for r in metrics_records(out) if "loss" in r and "eval_loss" not in r]


def _data(tmp_path: Path, n_train: int = 24, n_eval: int = 8) -> list[str]:
    from fastdpo.tiny import preference_rows

    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(n_train, seed=5)))
    held.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(n_eval, seed=9)))
    return ["--data", str(train), "--eval-data", str(held)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------------- LoRA / QLoRA
def test_lora_adapter_is_trained_saved_and_loads_with_peft(tmp_path, capsys):
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert _train(out, "--lora-r", "4") == 0
    assert "LoRA r=4" in capsys.readouterr().out
    model_dir = out / "model"
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and Path(config["base_model_name_or_path"]) == (out / "reference").resolve()
    adapter = _weights(model_dir)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter trained
    # peft loads it onto the base named in its config; the base stayed the initial model
    loaded = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(out / "reference")
    merged = loaded.merge_and_unload()
    diff = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert diff and all("proj" in n for n in diff)  # only the adapted linear layers changed
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.library_name == "peft" and {"fastdpo", "dpo", "lora"} <= set(card.data.tags)
    assert "| lora_r | `4` |" in card.text and "AutoPeftModelForCausalLM" in card.text


def test_qlora_trains_an_adapter_over_a_4bit_base(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from fastdpo.train import build_parser
    from fastdpo.train_setup import build_policy

    out = tmp_path / "qlora"
    assert _train(out, "--qlora", "--lora-r", "4", "--lr", "1e-2") == 0
    assert "QLoRA" in capsys.readouterr().out
    assert json.loads((out / "model" / "adapter_config.json").read_text())["r"] == 4
    assert any(float(v.abs().max()) > 0 for k, v in _weights(out / "model").items() if "lora_B" in k)
    # the policy built for --qlora: LoRA layers whose base layers are bitsandbytes 4-bit, frozen
    args = build_parser().parse_args(["--qlora", "--lora-r", "4"])
    policy, ref_model, reference = build_policy(args, str(out / "reference"), torch.float32, torch.device("cpu"))
    four_bit = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and ref_model is None and reference == "adapter"
    assert all(not p.requires_grad for m in four_bit for p in m.parameters())
    assert {n for n, p in policy.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in policy.named_parameters() if p.requires_grad
    )


def test_lora_run_resumes_identically(tmp_path):
    common = ["--steps", "5", "--batch-size", "4", "--lora-r", "4", "--save-every", "0", *FAST]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["--output-dir", str(full), *common]) == 0
    assert main(["--output-dir", str(cut), *common, "--stop-after", "2"]) == 0
    assert main(["--output-dir", str(cut), *common, "--resume"]) == 0
    assert metrics_records(full) == metrics_records(cut)
    a, b = _weights(full / "model"), _weights(cut / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ accumulation, packing, losses
def test_grad_accum_equals_the_larger_batch(tmp_path):
    data = _data(tmp_path)
    one, accum = tmp_path / "one", tmp_path / "accum"
    assert _train(one, *data) == 0
    assert _train(accum, "--grad-accum", "2", *data, batch_size=2) == 0
    for a, b in zip(_steps(one), _steps(accum), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert _steps(one)[-1]["rewards/margins"] != 0.0
    # AdamW divides by sqrt(v): rounding-level gradient differences move near-zero-gradient weights by ~1e-5 (the
    # weights themselves move by up to lr * steps = 9e-3)
    wa, wb = _weights(one / "model"), _weights(accum / "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4)


def test_every_packing_gives_the_same_step(tmp_path):
    data = _data(tmp_path)
    runs = {}
    for packing in ("pad", "padding_free", "prefix_shared"):
        out = tmp_path / packing
        assert _train(out, "--packing", packing, *data, steps=2) == 0
        runs[packing] = _steps(out)
    for packing in ("padding_free", "prefix_shared"):
        for a, b in zip(runs["pad"], runs[packing], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["logps/chosen"] == pytest.approx(
                a["logps/chosen"], rel=1e-5
            ), packing


def test_loss_type_list_with_weights(tmp_path):
    data = _data(tmp_path)
    first = {}
    for name, extra in (
        ("sigmoid", ["--loss-type", "sigmoid"]),
        ("sft", ["--loss-type", "sft"]),
        ("mix", ["--loss-type", "sigmoid", "sft", "--loss-weights", "1.0", "0.25"]),
    ):
        out = tmp_path / name
        assert _train(out, *extra, *data, steps=1) == 0
        first[name] = _steps(out)[0]["loss"]
    assert first["mix"] == pytest.approx(first["sigmoid"] + 0.25 * first["sft"], rel=1e-6)
    assert first["sft"] > 1.0  # a real NLL, so the mixture is distinguishable from sigmoid alone


def test_truncation_mode_reaches_the_collator(tmp_path):
    """Step-0 held-out log-probs equal those of a PreferenceCollator with the same truncation on the initial model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdpo import DPOEngine, PreferenceCollator
    from fastdpo.data import pretokenize, read_preference_file

    data = _data(tmp_path)
    logps = {}
    for mode in ("keep_end", "keep_start"):
        out = tmp_path / mode
        assert (
            _train(out, "--max-length", "12", "--truncation-mode", mode, "--eval-batch-size", "8", *data, steps=1) == 0
        )
        logps[mode] = metrics_records(out)[0]["eval_logps/chosen"]
        tok = AutoTokenizer.from_pretrained(out / "reference")
        model = AutoModelForCausalLM.from_pretrained(out / "reference")
        collator = PreferenceCollator(tok, max_length=12, truncation_mode=mode)
        rows = pretokenize(collator, read_preference_file(data[3])[0])
        with torch.no_grad():
            _, metrics = DPOEngine(model, AutoModelForCausalLM.from_pretrained(out / "reference")).step(collator(rows))
        assert logps[mode] == pytest.approx(float(metrics["logps/chosen"]), rel=1e-5)
    assert logps["keep_end"] != pytest.approx(logps["keep_start"], rel=1e-3)


# --------------------------------------------------------------------------------------------------- TensorBoard
def test_report_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert _train(out, "--eval-batches", "1", "--report-to", "tensorboard") == 0
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/lr", "eval/loss", "eval/rewards/accuracies"} <= tags
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in _steps(out)}, rel=1e-6)


# ------------------------------------------------------------------------------------------------------- torchrun
@needs_gloo
def test_torchrun_two_processes_equal_one_process(tmp_path):
    """2 gloo processes with 3 pairs each train like one process with the 6-pair batch: same losses, metrics,
    held-out metrics and final weights (the loss of each process is weighted by its share of the global batch)."""
    data = _data(tmp_path, n_train=20, n_eval=6)
    common = ["--steps", "3", "--seed", "1", *data, *FAST, "--eval-every", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fastdpo.cli",
            "train",
            "--output-dir",
            str(two),
            "--batch-size",
            "3",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("model written to") == 1
    assert main(["--output-dir", str(one), "--batch-size", "6", *common]) == 0
    a, b = metrics_records(one), metrics_records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    token_level = ("logits/", "entropy", "mean_token_accuracy")
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            # held-out token-level metrics are pair-weighted means of each process's token means (documented);
            # the training metrics are gathered over the processes, all equal
            if isinstance(value, float) and not (key.startswith("eval_") and any(t in key for t in token_level)):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ra["step"], key)
    assert a[-1]["eval_rewards/margins"] != 0.0
    wa, wb = _weights(one / "model"), _weights(two / "model")
    for name in wa:  # AdamW: see test_grad_accum_equals_the_larger_batch
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------------------- usage errors
BAD = [
    (["--loss-type", "sigmoid", "sft", "--loss-weights", "1.0"], "--loss-weights"),
    (["--lora-alpha", "8"], "--lora-alpha"),
    (["--lora-target-modules", "q_proj"], "--lora-target-modules"),
    (["--lora-dropout", "0.1"], "--lora-dropout"),
    (["--lora-r", "0"], "--lora-r"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--qlora", "--dtype", "float16"], "--qlora"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--report-to", "wandb"], "--report-to"),
    (["--truncation-mode", "middle"], "--truncation-mode"),
    (["--max-prompt-length", "-1"], "--max-prompt-length"),
    (["--lora-r", "4", "--lora-target-modules", "no_such_module", "--hidden-size", "16"], "--lora-target-modules"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_new_arguments_usage_errors(args, needle, tmp_path, capsys):
    from fastdpo.cli import main as cli_main

    capsys.readouterr()
    try:
        code = cli_main(["train", "--output-dir", str(tmp_path / "out"), "--no-progress", "--steps", "1", *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (code, err)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_resume_refuses_other_grad_accum(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--steps", "3", "--batch-size", "2", *FAST]
    assert main([*common, "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--resume", "--grad-accum", "2"]) == 2
    assert "--grad-accum" in capsys.readouterr().err
