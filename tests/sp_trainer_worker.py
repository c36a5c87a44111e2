"""``FastDPOTrainer(sequence_parallel_size=k)`` under accelerate (``tests/test_sequence_parallel.py``).

Multi-process: ``python -m torch.distributed.run --standalone --nproc_per_node W tests/sp_trainer_worker.py --sp K
--data rows.jsonl --eval-data eval.jsonl --out DIR`` (accelerate's ``MULTI_CPU``, gloo). Single process (the
reference): the same script run with plain ``python`` and ``--sp 1 --batch-size W/K·B``, so that one step sees the
pairs all data-parallel ranks see together. Every process trains the same seeded tiny Llama (:mod:`fastdpo.tiny`) for
``STEPS`` SGD steps with ``packing="prefix_shared"`` against a separate reference model, evaluates, and writes
``DIR/rank{R}.pt``: ``{"steps": log_history entries with "loss", "eval": evaluate() metrics, "params": {name: fp32
param after training}, "inputs": [sum of the input_ids compute_loss received, per training step], "wrapped": type
names of the models compute_loss received, "num_processes": int}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--sp", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=2, help="per-device train batch size (pairs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import datasets
    from helpers import dpo_config, dpo_trainer, json_rows

    from fastdpo.integrations.trl import FastDPOTrainer
    from fastdpo.tiny import make_model, make_tokenizer

    datasets.disable_progress_bars()
    rank = int(os.environ.get("RANK", "0"))
    out_dir = Path(args.out)
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="sdpa", seed=0).train()
    ref = make_model("llama", tok, attn_implementation="sdpa", seed=1)
    config = dpo_config(
        out_dir / f"run-sp{args.sp}",
        per_device_train_batch_size=args.batch_size,
        max_steps=STEPS,
        learning_rate=0.05,
        per_device_eval_batch_size=args.batch_size,
    )
    cache_dir = out_dir / f"hf_cache-sp{args.sp}"
    train, evals = json_rows(args.data, cache_dir), json_rows(args.eval_data, cache_dir)

    class Recording(FastDPOTrainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            if self.model.training:
                self.recorded.append((type(model).__name__, int(inputs["input_ids"].sum())))
            return super().compute_loss(model, inputs, *a, **kw)

    trainer = dpo_trainer(
        Recording, tok, model, ref, config, train, evals, packing="prefix_shared", sequence_parallel_size=args.sp
    )
    trainer.recorded = []
    trainer.train()
    eval_metrics = trainer.evaluate()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    torch.save(
        {
            "steps": [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h],
            "eval": eval_metrics,
            "params": {n: p.detach().float().clone() for n, p in unwrapped.named_parameters()},
            "inputs": [s for _, s in trainer.recorded],
            "wrapped": sorted({w for w, _ in trainer.recorded}),
            "num_processes": trainer.accelerator.num_processes,
            "attn": unwrapped.config._attn_implementation,
        },
        out_dir / f"rank{rank}.pt",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
