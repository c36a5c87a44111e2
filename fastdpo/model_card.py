"""The model cards (``README.md``) fastdpo writes next to the models it trains.

``fastdpo train`` (:func:`write_model_card`): a Hugging Face model card: YAML metadata (``library_name``
``transformers``, or ``peft`` for a LoRA / QLoRA adapter, ``tags`` ``fastdpo``, ``dpo``, the packing and
``lora``/``qlora`` when used, ``base_model`` when the base is a Hub id) and a text with the training settings, the
held-out metrics before and after training, and how to load the model. ``huggingface_hub.ModelCard.load`` reads it
back.

``FastDPOTrainer`` (:func:`add_fastdpo_settings`): TRL's own card, its "trained using TRL" line naming fastdpo's
engine, plus a "fastdpo settings" section and the fastdpo version under the framework versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_fastdpo_settings", "write_model_card"]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def write_model_card(
    folder: str | Path,
    *,
    name: str,
    location: str,
    base: str,
    adapter: str | None,
    settings: Mapping[str, Any],
    metrics_before: Mapping[str, float] | None,
    metrics_after: Mapping[str, float] | None,
) -> Path:
    """Write ``folder/README.md`` and return its path.

    Args:
        folder: the saved model (or adapter) folder.
        name: the model's name (the output folder's name).
        location: where the model will be loaded from (the final model folder).
        base: the base model: a local folder or a Hub id (only a Hub id goes into ``base_model``).
        adapter: ``None`` for a full model, ``"lora"`` or ``"qlora"`` for an adapter saved with PEFT.
        settings: training settings shown in the card (``packing``, ``loss_type``, ...).
        metrics_before, metrics_after: held-out metrics (``eval_*``) before and after training.
    """
    from huggingface_hub import ModelCard, ModelCardData

    import fastdpo

    is_hub_id = not Path(base).exists() and base.count("/") == 1
    tags = ["fastdpo", "dpo", f"fastdpo-packing-{settings.get('packing', 'pad')}"]
    if adapter:
        tags.append(adapter)
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        tags=tags,
        base_model=base if is_hub_id else None,
        model_name=name,
    )
    rows = "\n".join(f"| {k} | `{_value(v)}` |" for k, v in settings.items())
    keys = sorted({*(metrics_before or {}), *(metrics_after or {})})
    metric_rows = "\n".join(
        f"| {k.removeprefix('eval_')} | {_value((metrics_before or {}).get(k, '-'))} | "
        f"{_value((metrics_after or {}).get(k, '-'))} |"
        for k in keys
    )
    if adapter:
        load = (
            "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")  # base: {base}\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n```'
        )
        what = f"a {'QLoRA (4-bit bitsandbytes base)' if adapter == 'qlora' else 'LoRA'} adapter for `{base}`, trained"
    else:
        load = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{location}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n```'
        )
        what = f"`{base}` fine-tuned"
    text = (
        f"# {name}\n\n"
        f"This is {what} with Direct Preference Optimization by `fastdpo train` (fastdpo {fastdpo.__version__}: "
        "fused LM head, no `[tokens, vocabulary]` logits).\n\n"
        f"## Use\n\n{load}\n\n"
        f"## Training settings\n\n| setting | value |\n|---|---|\n{rows}\n\n"
        + (f"## Held-out metrics\n\n| metric | before | after |\n|---|---|---|\n{metric_rows}\n" if keys else "")
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def add_fastdpo_settings(path: str | Path, settings: Mapping[str, Any]) -> None:
    """Rewrite the TRL model card at ``path`` (atomically): TRL's "trained using TRL" sentence names fastdpo's engine
    (``FastDPOTrainer``), a "### fastdpo settings" section lists ``settings`` (``- key: `value` `` lines) before TRL's
    "### Framework versions" section, which gains a ``fastdpo`` line (the section goes at the end of a card without
    one)."""
    import fastdpo
    from fastdpo.atomic import atomic_write

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    trained = "It has been trained using [TRL](https://github.com/huggingface/trl)."
    text = text.replace(
        trained,
        trained[:-1] + " with fastdpo's DPO engine (`fastdpo.integrations.trl."
        "FastDPOTrainer`: fused LM head, no `[tokens, vocabulary]` logits).",
    )
    section = "### fastdpo settings\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in settings.items())
    anchor = "### Framework versions\n\n"
    if anchor in text:
        text = text.replace(anchor, section + "\n" + anchor + f"- fastdpo: {fastdpo.__version__}\n", 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
