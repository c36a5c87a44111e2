"""One rank of the 2-process tests in ``tests/test_trl_distributed.py``: TRL 1.16's ``DPOTrainer`` and
``FastDPOTrainer`` trained under accelerate data parallelism (CPU, gloo, ``DistributedType.MULTI_CPU``).

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_dist_worker.py --data
rows.jsonl --eval-data eval.jsonl --out DIR --cases CASE[,CASE...]`` (torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; accelerate's ``PartialState`` picks them up). Every rank builds the
same seeded tiny Llama (:mod:`fastdpo.tiny`) and, per case, trains it 3 optimizer steps with each trainer on the rows of
``--data``; accelerate shards every global batch over the ranks. Rank ``R`` writes ``DIR/rank{R}.pt``::

    {case: {trainer: {"steps": [log_history entries with "loss"], "eval": evaluate() metrics or None,
                      "params": {name: fp32 trainable param after training}, "num_processes": int,
                      "distributed_type": str, "process_index": int,
                      "wrapped": [type names of the models compute_loss received in training steps],
                      "local_input_sums": [int: sum of this rank's input_ids per training batch]}}}

Cases: ``ref_model`` (full fine-tuning against a separate reference model, which TRL prepares with
``accelerator.prepare_model(evaluation_mode=True)``; then ``evaluate()`` on ``--eval-data``), ``lora`` (a PEFT LoRA
policy whose reference is the base model under disabled adapters), ``precompute`` (reference log-probs precomputed
over the rank shards and gathered) and ``grad_accum`` (``ref_model`` with 2 accumulation micro-batches per step: DDP
skips the all-reduce of the first under ``no_sync``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES = ("ref_model", "lora", "precompute", "grad_accum")
STEPS = 3


def _recording(cls: type) -> type:
    """``cls`` with ``compute_loss`` recording what a training step received (wrapper type, this rank's batch)."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training:
                self.recorded_wrapped.append(type(model).__name__)
                self.recorded_inputs.append(int(inputs["input_ids"].sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    Recording.__name__ = cls.__name__
    return Recording


def run_case(case: str, trainer_name: str, data: Path, eval_data: Path, out_dir: Path) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer
    from fastdpo.tiny import make_model, make_tokenizer

    datasets.disable_progress_bars()
    cls = _recording(FastDPOTrainer if trainer_name == "fast" else DPOTrainer)
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager", seed=0)
    model.train()
    peft = case == "lora"
    ref = make_model("llama", tok, attn_implementation="eager", seed=1) if case in ("ref_model", "grad_accum") else None
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                             task_type="CAUSAL_LM") if peft else None
    args = DPOConfig(
        output_dir=str(out_dir / f"{case}-{trainer_name}"), per_device_train_batch_size=3, max_steps=STEPS,
        logging_steps=1, optim="sgd", learning_rate=0.5 if peft else 0.02, lr_scheduler_type="constant", seed=0,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, beta=0.5,
        per_device_eval_batch_size=2, precompute_ref_log_probs=case == "precompute", precompute_ref_batch_size=2,
        gradient_accumulation_steps=2 if case == "grad_accum" else 1,
    )
    # On disk, in a cache directory both ranks share: TRL's precompute writes the reference log-probs to a cache file
    # next to the dataset on the main process and every rank reads it back (an in-memory dataset caches per process).
    # One directory per trainer, so that FastDPOTrainer computes its own reference log-probs instead of finding TRL's.
    cache_dir = out_dir / f"hf_cache-{case}-{trainer_name}"
    train = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache_dir))
    evaluate = case == "ref_model"
    evals = datasets.load_dataset("json", data_files=str(eval_data), split="train",
                                  cache_dir=str(cache_dir)) if evaluate else None
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=train, eval_dataset=evals,
                  processing_class=tok, peft_config=peft_config)
    trainer.recorded_wrapped, trainer.recorded_inputs = [], []
    torch.manual_seed(1234)
    trainer.train()
    eval_metrics = trainer.evaluate() if evaluate else None
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "eval": eval_metrics,
        "steps": [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h],
        "params": {n: p.detach().float().clone() for n, p in unwrapped.named_parameters() if p.requires_grad},
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "process_index": trainer.accelerator.process_index,
        "wrapped": sorted(set(trainer.recorded_wrapped)),
        "local_input_sums": trainer.recorded_inputs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    parser.add_argument("--data", required=True, help="JSON-lines preference rows (prompt, chosen, rejected)")
    parser.add_argument("--eval-data", required=True, help="rows for the evaluation after training (ref_model case)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out_dir = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
        results[case] = {}
        for trainer_name in ("trl", "fast"):  # an exception fails this rank; torchrun then stops its peer
            results[case][trainer_name] = run_case(case, trainer_name, Path(args.data), Path(args.eval_data),
                                                   out_dir)
    torch.save(results, out_dir / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
