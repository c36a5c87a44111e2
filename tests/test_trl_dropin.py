"""FastDPOTrainer drop-in fidelity (issue 18, items 1-5): torch_compile compiles the backbone, predict() returns the
per-pair log-probs and rewards (and compute_metrics receives them), TRL's DataCollatorForPreference is accepted,
use_liger_kernel is checked, and the model card names fastdpo and its settings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import dpo_config

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fastdpo.integrations.trl import PREDICTION_COLUMNS, FastDPOTrainer
from fastdpo.reference import naive_completion_logps
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, name: str, **overrides) -> DPOConfig:
    return dpo_config(tmp_path / name, **{"per_device_eval_batch_size": 3, "max_steps": 2, **overrides})


def _trainer(cls, tmp_path, name: str, *, args_kw: dict | None = None, n_eval: int = 7, **kw):
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager", seed=0)
    model.train()
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    return cls(
        model=model,
        ref_model=ref,
        args=_config(tmp_path, name, **(args_kw or {})),
        train_dataset=datasets.Dataset.from_list(preference_rows(8, seed=3)),
        eval_dataset=datasets.Dataset.from_list(preference_rows(n_eval, seed=11)),
        processing_class=tok,
        **kw,
    )


def _train_losses(trainer) -> list[float]:
    torch.manual_seed(1234)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


# ----------------------------------------------------------------------------------------------------- 1. compile
def test_torch_compile_compiles_the_backbone(tmp_path, monkeypatch):
    """torch_compile=True really compiles graphs (counted by dynamo) and trains to the eager losses."""
    from torch._dynamo.utils import counters

    eager = _train_losses(_trainer(FastDPOTrainer, tmp_path, "eager"))
    # TrainingArguments exports the backend to the environment; keep it out of later tests
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(
        FastDPOTrainer, tmp_path, "compiled", args_kw={"torch_compile": True, "torch_compile_backend": "aot_eager"}
    )
    assert trainer.compiled_layers == 4  # 2 decoder layers of the policy + 2 of the reference
    compiled = _train_losses(trainer)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 2, f"torch_compile compiled {graphs} graphs"
    assert len(compiled) == len(eager) == 2
    for a, b in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_torch_compile_refuses_a_model_without_decoder_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager")
    model._no_split_modules = []
    with pytest.raises(NotImplementedError, match="torch_compile"):
        FastDPOTrainer(
            model=model,
            ref_model=make_model("llama", tok, seed=1),
            args=_config(tmp_path, "x", torch_compile=True, torch_compile_backend="aot_eager"),
            train_dataset=datasets.Dataset.from_list(preference_rows(4)),
            processing_class=tok,
        )


# ----------------------------------------------------------------------------------------------------- 2. predict
def _naive_logps(model, ids: list[int], prompt_len: int) -> float:
    """float64 summed log-probs of ids[prompt_len:] given everything before, from full logits (a float64 forward)."""
    try:
        return naive_completion_logps(model.double(), ids[:prompt_len], ids[prompt_len:])
    finally:
        model.float()


@pytest.mark.parametrize("packing", ["pad", "prefix_shared"])
def test_predict_returns_pair_logps_rewards_and_trl_labels(tmp_path, packing):
    fast = _trainer(FastDPOTrainer, tmp_path, f"fast-{packing}", packing=packing)
    out = fast.predict(fast.eval_dataset)
    assert out.predictions is not None and out.predictions.shape == (7, len(PREDICTION_COLUMNS))
    pred = dict(zip(PREDICTION_COLUMNS, out.predictions.T))
    beta = fast.args.beta
    np.testing.assert_allclose(
        pred["chosen_rewards"], beta * (pred["chosen_logps"] - pred["ref_chosen_logps"]), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        pred["rejected_rewards"], beta * (pred["rejected_logps"] - pred["ref_rejected_logps"]), rtol=1e-6, atol=1e-6
    )
    # independent check: float64 log-probs from full logits of the policy and the reference
    rows = fast.eval_dataset
    for i in (0, 4, 6):
        row = rows[i]
        n = len(row["prompt_ids"])
        for key, col, model in (
            ("chosen_ids", "chosen_logps", fast.model),
            ("rejected_ids", "rejected_logps", fast.model),
            ("chosen_ids", "ref_chosen_logps", fast.ref_model),
        ):
            want = _naive_logps(model, row["prompt_ids"] + row[key], n)
            assert pred[col][i] == pytest.approx(want, rel=1e-5, abs=1e-4), (i, col)
    # label ids: what TRL's DPOTrainer.predict returns (its input_ids), whatever fastdpo's packing
    trl = _trainer(DPOTrainer, tmp_path, f"trl-{packing}")
    trl_out = trl.predict(trl.eval_dataset)
    np.testing.assert_array_equal(out.label_ids, trl_out.label_ids)
    assert out.metrics["test_loss"] == pytest.approx(trl_out.metrics["test_loss"], rel=1e-5)


def test_compute_metrics_receives_the_predictions(tmp_path):
    seen = {}

    def compute_metrics(p):
        seen["shape"], seen["labels"] = p.predictions.shape, p.label_ids.shape
        return {"pair_accuracy": float((p.predictions[:, 2] > p.predictions[:, 3]).mean())}

    trainer = _trainer(FastDPOTrainer, tmp_path, "cm", compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    # label ids as TRL gives them: [2P, L] per batch (3 + 3 + 1 pairs); accelerate's gather_for_metrics cuts the
    # last batch to the dataset's remaining sample count (1 row of 2), for TRL's labels as for these
    assert seen["shape"] == (7, 6) and seen["labels"][0] == 6 + 6 + 1, seen
    pred = trainer.predict(trainer.eval_dataset).predictions
    assert metrics["eval_pair_accuracy"] == pytest.approx(float((pred[:, 2] > pred[:, 3]).mean()))
    assert 0.0 < metrics["eval_pair_accuracy"] < 1.0  # the separate reference makes rewards non-trivial


# ----------------------------------------------------------------------------------------------- 3. TRL collator
@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_trl_collator_gives_the_default_paths_loss(tmp_path, packing):
    """TRL's DataCollatorForPreference (its truncation settings) gives the losses of the default path configured
    the same way through DPOConfig, and TRL's own losses."""
    trunc = {"max_length": 18, "truncation_mode": "keep_end"}
    default = _train_losses(_trainer(FastDPOTrainer, tmp_path, "default", args_kw=trunc, packing=packing))
    tok = make_tokenizer()
    trl_collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, **trunc)
    fast = _trainer(FastDPOTrainer, tmp_path, "collator", data_collator=trl_collator, packing=packing)
    given = _train_losses(fast)
    reference = _train_losses(_trainer(DPOTrainer, tmp_path, "trl", data_collator=trl_collator))
    assert fast.packing == packing
    assert given == pytest.approx(default, rel=1e-6, abs=1e-7)
    if packing != "prefix_shared":  # prefix_shared keeps one prompt cut per pair (documented)
        assert given == pytest.approx(reference, rel=2e-4, abs=2e-5)


def test_trl_collator_subclass_with_its_own_layout_is_refused(tmp_path):
    class Custom(DataCollatorForPreference):
        def torch_call(self, examples):
            return super().torch_call(examples)

    with pytest.raises(NotImplementedError, match="torch_call"):
        _trainer(FastDPOTrainer, tmp_path, "custom", data_collator=Custom(pad_token_id=0))


# ------------------------------------------------------------------------------------------------- 4. liger kernel
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_use_liger_kernel_without_cuda_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="use_liger_kernel"):
        _trainer(FastDPOTrainer, tmp_path, "liger", args_kw={"use_liger_kernel": True})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's layer kernels need CUDA")
def test_use_liger_kernel_on_cuda_matches_trl(tmp_path):
    kw = {"use_liger_kernel": True, "use_cpu": False}
    fast = _trainer(FastDPOTrainer, tmp_path, "fast-liger", args_kw=kw)
    assert "Liger" in type(fast.model.model.norm).__name__  # Liger's layer kernels are in the backbone
    assert _train_losses(fast) == pytest.approx(
        _train_losses(_trainer(DPOTrainer, tmp_path, "trl-liger", args_kw=kw)), rel=2e-4, abs=2e-5
    )


# --------------------------------------------------------------------------------------------------- 5. model card
def test_model_card_names_fastdpo_and_its_settings(tmp_path):
    from huggingface_hub import ModelCard

    trainer = _trainer(
        FastDPOTrainer,
        tmp_path,
        "card",
        packing="prefix_shared",
        grad_in_forward=True,
        args_kw={"save_strategy": "steps", "save_steps": 2},
    )
    trainer.train()  # the checkpoint save writes the card
    readme = os.path.join(trainer.args.output_dir, "README.md")
    card = ModelCard.load(readme)
    tags = set(card.data.tags)
    assert {"trl", "dpo", "fastdpo", "fastdpo-packing-prefix_shared", "fastdpo-grad-in-forward"} <= tags
    text = card.text
    assert "FastDPOTrainer" in text and "### fastdpo settings" in text
    assert "- packing: `prefix_shared`" in text and "- grad_in_forward: `True`" in text
    assert "- reference: `model`" in text and "- fastdpo: " in text
    assert "fastdpo" in trainer.model.model_tags
