"""FastDPOTrainer against TRL 1.16's DPOTrainer: same tiny model, batches and seed -> same loss, gradients (through the
logged grad norm) and metrics over 3 optimizer steps, for every loss type, with a separate reference model and with
a PEFT LoRA policy; plus the options TRL has and fastdpo refuses."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from helpers import TRL_STEP_METRICS, dpo_config

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

from peft import LoraConfig, PromptTuningConfig
from trl import DPOConfig, DPOTrainer

from fastdpo.integrations.trl import FastDPOTrainer
from fastdpo.losses import LOSS_TYPES
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
# metrics that must agree between the trainers (TRL's names); everything TRL logs per step is compared
_SKIP = {"epoch", "step", "learning_rate"}


# tiny models gain nothing from intra-op threads; one thread keeps the shared cores free for other workers
pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = 12, seed: int = 3):
    return datasets.Dataset.from_list(preference_rows(n, seed=seed))


def _config(tmp_path, **overrides) -> DPOConfig:
    return dpo_config(tmp_path, **{"per_device_eval_batch_size": 4, "gradient_checkpointing": False, **overrides})


def _run(
    trainer_cls,
    tmp_path,
    *,
    peft: bool,
    evaluate: bool = False,
    args_kw: dict | None = None,
    trainer_kw: dict | None = None,
):
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager", seed=0)
    model.train()
    ref = None if peft else make_model("llama", tok, attn_implementation="eager", seed=1)
    peft_config = (
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
        )
        if peft
        else None
    )
    args = _config(tmp_path / trainer_cls.__name__, **(args_kw or {}))
    trainer = trainer_cls(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(6, seed=11) if evaluate else None,
        processing_class=tok,
        peft_config=peft_config,
        **(trainer_kw or {}),
    )
    torch.manual_seed(1234)  # the train sampler draws from the global generator
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    evals = trainer.evaluate() if evaluate else None
    return steps, evals


def _assert_same(fast: list[dict], ref: list[dict], *, rel: float = 2e-4, abs_: float = 2e-5) -> None:
    assert len(ref) == 3 and len(fast) == 3, (len(fast), len(ref))
    for step, (f, r) in enumerate(zip(fast, ref), start=1):
        expected = {k for k in r if k not in _SKIP}
        assert expected <= set(f), f"step {step}: FastDPOTrainer did not log {sorted(expected - set(f))}"
        for key in sorted(expected):
            assert math.isfinite(f[key]), (step, key, f[key])
            assert f[key] == pytest.approx(r[key], rel=rel, abs=abs_), f"step {step} {key}: {f[key]} vs TRL {r[key]}"


def _losses_move(steps: list[dict]) -> None:
    """The comparison must be able to fail: the parameters change between steps (loss or rewards move)."""
    assert len({round(s["loss"], 7) for s in steps}) > 1 or len({round(s["rewards/margins"], 7) for s in steps}) > 1


def test_loss_types_are_trls() -> None:
    """The loss types run below are TRL's own: ``fastdpo.losses.LOSS_TYPES`` is the list ``DPOConfig.loss_type``
    documents, in TRL's order."""
    (field,) = [f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type"]
    documented = field.metadata["help"].split("Possible values are:")[1].split(".")[0]
    assert tuple(re.findall(r"`'(\w+)'`", documented)) == LOSS_TYPES


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_with_ref_model(tmp_path, loss_type):
    kw = {"loss_type": [loss_type], "label_smoothing": _SMOOTHING.get(loss_type, 0.0)}
    fast, _ = _run(FastDPOTrainer, tmp_path, peft=False, args_kw=kw)
    ref, _ = _run(DPOTrainer, tmp_path, peft=False, args_kw=kw)
    _losses_move(ref)
    _assert_same(fast, ref)
    assert ref[0]["rewards/margins"] != 0.0  # separate reference: rewards are non-trivial from step 1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_with_peft_lora(tmp_path, loss_type):
    kw = {"loss_type": [loss_type], "label_smoothing": _SMOOTHING.get(loss_type, 0.0), "learning_rate": 0.5}
    fast, _ = _run(FastDPOTrainer, tmp_path, peft=True, args_kw=kw)
    ref, _ = _run(DPOTrainer, tmp_path, peft=True, args_kw=kw)
    _assert_same(fast, ref)
    assert ref[-1]["rewards/margins"] != 0.0  # the adapter moved away from the (adapter-disabled) reference


@pytest.mark.parametrize(
    "case",
    [
        {"args_kw": {"loss_type": ["sigmoid", "sft", "ipo"], "loss_weights": [0.8, 0.2, 1.0]}},
        {"args_kw": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}},
        {"args_kw": {"f_divergence_type": "js_divergence", "loss_type": ["robust"], "label_smoothing": 0.2}},
        {"args_kw": {"ld_alpha": 0.5}},
        {"args_kw": {"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]}},  # sft trains on the plain (un-LD) NLL
        {"args_kw": {"use_weighting": True}},
        {"args_kw": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 5}},
        {"args_kw": {"gradient_checkpointing": True, "max_length": 24}},
        {"args_kw": {"padding_free": True}},  # TRL ignores it (pads); fastdpo packs -- the numbers must not change
        {"trainer_kw": {"packing": "prefix_shared"}},
        {"args_kw": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}},
    ],
    ids=[
        "mpo-weights",
        "alpha-div",
        "js-robust",
        "ld-alpha",
        "ld-sft",
        "wpo",
        "precompute",
        "grad-ckpt-trunc",
        "padding-free",
        "prefix-shared",
        "grad-accum",
    ],
)
def test_matches_trl_options(tmp_path, case):
    fast, fast_eval = _run(
        FastDPOTrainer,
        tmp_path,
        peft=False,
        evaluate=True,
        args_kw=case.get("args_kw"),
        trainer_kw=case.get("trainer_kw"),
    )
    ref, ref_eval = _run(DPOTrainer, tmp_path, peft=False, evaluate=True, args_kw=case.get("args_kw"))
    _assert_same(fast, ref)
    for key, value in ref_eval.items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert fast_eval[key] == pytest.approx(value, rel=2e-4, abs=2e-5), (key, fast_eval[key], value)


@pytest.mark.parametrize(
    "args_kw",
    # (TRL 1.16 itself fails on use_weighting with "sft": an in-place multiply of an expanded tensor)
    [{}, {"ld_alpha": 0.5, "use_weighting": True, "loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.3]}],
    ids=["sigmoid", "ld-wpo-ipo"],
)
def test_grad_in_forward_same_loss(tmp_path, args_kw):
    """grad_in_forward changes how the head's gradient is formed, not the optimization: same loss and rewards."""
    fast, _ = _run(FastDPOTrainer, tmp_path, peft=False, args_kw=args_kw, trainer_kw={"grad_in_forward": True})
    ref, _ = _run(DPOTrainer, tmp_path, peft=False, args_kw=args_kw)
    for f, r in zip(fast, ref):
        for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen", "num_tokens"):
            assert f[key] == pytest.approx(r[key], rel=2e-4, abs=2e-5), key
    assert "entropy" not in fast[0]  # token metrics are not computed on that path


def test_matches_trl_retraining_an_existing_adapter(tmp_path):
    """A PeftModel passed without peft_config: TRL copies its adapter to a frozen "ref" adapter (the reference is
    the pre-trained adapter, not the bare base model); FastDPOTrainer must use the same reference."""
    from peft import get_peft_model

    def run(trainer_cls):
        tok = make_tokenizer()
        base = make_model("llama", tok, attn_implementation="eager", seed=0)
        torch.manual_seed(7)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], task_type="CAUSAL_LM")
        )
        with torch.no_grad():  # a "pre-trained" adapter: B != 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        args = _config(tmp_path / trainer_cls.__name__, learning_rate=0.5)
        trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), processing_class=tok)
        torch.manual_seed(1234)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]

    fast, ref = run(FastDPOTrainer), run(DPOTrainer)
    _assert_same(fast, ref)
    assert ref[-1]["rewards/margins"] != 0.0


def _trainer(tmp_path, **kw):
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager")
    args = kw.pop("args", None) or _config(tmp_path)
    return FastDPOTrainer(
        model=model,
        ref_model=kw.pop("ref_model", make_model("llama", tok, seed=1)),
        args=args,
        train_dataset=kw.pop("train_dataset", _dataset()),
        processing_class=tok,
        **kw,
    )


def test_unsupported_options_raise(tmp_path):
    # (compute_metrics is supported since issue 18: tests/test_trl_dropin.py)
    with pytest.raises(NotImplementedError, match="data_collator"):
        _trainer(tmp_path, data_collator=lambda rows: rows)
    with pytest.raises(NotImplementedError, match="vision"):
        rows = [dict(r, images=[]) for r in preference_rows(4)]
        _trainer(tmp_path, train_dataset=datasets.Dataset.from_list(rows))
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        _trainer(tmp_path, ref_model=None, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="packing"):
        _trainer(tmp_path, packing="bucketed")


def test_logs_trl_metric_names(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.packing == "pad"
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", *TRL_STEP_METRICS, "num_tokens"):
        assert key in logged, key


def test_accepts_a_preference_collator(tmp_path):
    from fastdpo.collator import PreferenceCollator

    tok = make_tokenizer()
    trainer = _trainer(tmp_path, data_collator=PreferenceCollator(tok, packing="prefix_shared"))
    assert trainer.packing == "prefix_shared"
    with pytest.raises(ValueError, match="disagrees"):
        _trainer(tmp_path, data_collator=PreferenceCollator(tok, packing="pad"), packing="padding_free")
