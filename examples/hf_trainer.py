"""DPO with a plain Hugging Face ``transformers.Trainer`` and fastdpo's ``DPOEngine`` -- offline, CPU, ~1 minute.

``Trainer`` needs three things from us, all shown below:

* a ``data_collator``: :class:`fastdpo.PreferenceCollator` (rows ``{"prompt", "chosen", "rejected"}`` -> batch);
  keep ``remove_unused_columns=False`` (the rows have no model-forward columns);
* ``compute_loss``: ``DPOEngine.step(batch)`` returns ``(loss, metrics)``; the loss goes back to ``Trainer`` (which
  does backward, gradient accumulation, clipping, the optimizer and scheduler), the metrics are stashed;
* ``log`` / ``prediction_step``: the stashed metrics (TRL's names: ``rewards/accuracies``, ``rewards/margins``,
  ``logps/chosen``, ...) are averaged into each log line; evaluation runs the same step without gradients.

If you already use TRL, :class:`fastdpo.integrations.trl.FastDPOTrainer` is the drop-in ``DPOTrainer`` instead.

Run::

    python examples/hf_trainer.py               # 150 steps on the bundled demo set
    python examples/hf_trainer.py --steps 10    # a quick smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from fastdpo import DPOEngine, PreferenceCollator
from fastdpo.data import demo_data_files, load_preference_file
from fastdpo.tiny import build_tiny_model, train_tokenizer


class EngineDPOTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``DPOEngine.step`` (the engine holds the policy and the reference)."""

    def __init__(self, *args: Any, engine: DPOEngine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine
        self._stash: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the engine runs its own forward passes of self.engine.model (== model on a single device)
        loss, metrics = self.engine.step(inputs)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._stash[mode][key].append(float(value))
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._stash[mode].items() if v})
        self._stash[mode].clear()
        super().log(logs, start_time)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-pairs", type=int, default=128)
    parser.add_argument("--output-dir", default=None, help="checkpoints/logs (default: a temporary folder)")
    args = parser.parse_args(argv)

    train_file, eval_file = demo_data_files()
    train_rows, eval_rows = load_preference_file(train_file), load_preference_file(eval_file)[: args.eval_pairs]
    tokenizer = train_tokenizer([r[k] for r in train_rows for k in ("prompt", "chosen", "rejected")])
    policy = build_tiny_model(tokenizer, "llama", seed=0)
    reference = build_tiny_model(tokenizer, "llama", seed=0)  # frozen copy of the initial policy
    engine = DPOEngine(policy, reference, reference="model", loss_type="sigmoid", beta=0.1)

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.lr,
            warmup_steps=10,
            max_grad_norm=1.0,
            logging_steps=max(1, args.steps // 6),
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=0,
        )
        trainer = EngineDPOTrainer(
            model=policy,
            args=training_args,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            data_collator=PreferenceCollator(tokenizer),
            engine=engine,
        )
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    print(
        f"held-out rewards/accuracies {before['eval_rewards/accuracies']:.3f} -> "
        f"{after['eval_rewards/accuracies']:.3f} (loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f})"
    )
    return after


if __name__ == "__main__":
    main()
