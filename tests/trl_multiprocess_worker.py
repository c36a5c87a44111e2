"""One rank of the multi-process trainer tests in ``tests/test_trl_multiprocess.py``: TRL 1.16's ``DPOTrainer`` and
``FastDPOTrainer`` trained side by side under DDP, DeepSpeed ZeRO or FSDP2 on 2 CPU processes.

Launch (every rank writes ``OUT/rank{R}.pt``)::

    accelerate launch --config_file zero3.yaml tests/trl_multiprocess_worker.py --setup zero3 --data rows.jsonl \\
        --eval-data eval.jsonl --out OUT --cases ref_model,lora,precompute,grad_accum,resume
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_multiprocess_worker.py --setup zero2 ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_multiprocess_worker.py --setup fsdp2 ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_multiprocess_worker.py --setup ddp ...

Setups:

* ``ddp``: accelerate's data parallelism (``DistributedType.MULTI_CPU``, a ``DistributedDataParallel`` wrapper)
  under ``torchrun``;
* ``zero3``: the DeepSpeed config comes from the accelerate launcher (``distributed_type: DEEPSPEED``,
  ``zero_stage: 3``, ``zero3_save_16bit_model: true``) -- the way TRL users launch ZeRO-3;
* ``zero2``: ``DPOConfig(deepspeed={...ZeRO stage 2...})`` under ``torchrun`` -- the other way;
* ``fsdp2``: ``DPOConfig(fsdp=True, fsdp_config={"version": 2, ...})`` under ``torchrun``. On CPU accelerate
  silently runs an FSDP configuration as DDP (``AcceleratorState`` only turns FSDP on for accelerator devices), so
  this worker makes ``AcceleratorState`` keep the FSDP2 plugin on CPU (:func:`_fsdp2_on_cpu`); from there on
  accelerate's own FSDP2 code runs: ``fsdp2_prepare_model`` (decoder layers, embedding and ``[norm, lm_head]`` tail
  sharded separately, root last), FSDP2 optimizer wiring, sharded/full state dicts, and TRL's ``prepare_fsdp`` of
  the reference model.

Cases (each trains 4 optimizer steps with both trainers, same seeds, same data shards):
``ref_model`` (full fine-tuning, separate reference model; then ``evaluate()``; then ``save_model`` and the saved
folder is reloaded with ``AutoModelForCausalLM.from_pretrained``), ``lora`` (a PEFT LoRA policy, no reference
model: adapter-disabled reference), ``precompute`` (``precompute_ref_log_probs=True`` without a reference model),
``grad_accum`` (2 accumulation micro-batches per step, with gradient checkpointing), ``zero1`` (``ref_model``
under ZeRO stage 1, in the ``zero2`` launch) and ``resume`` (FastDPOTrainer only, with precomputed reference
log-probs: 4 uninterrupted steps with a checkpoint every 2, then a new trainer resumes from the step-2
checkpoint; its last 2 steps and final parameters are compared with the uninterrupted run's, and the reference cache
must be read back, not recomputed).

Result per rank: ``{case: {trainer: {"steps": [log entries with "loss"], "eval": metrics or None,
"params": {name: full fp32 trainable parameter after training}, "distributed_type": str, "num_processes": int,
"process_index": int, "zero_stage": int | None, "fsdp_version": int | None, "wrapped": [types compute_loss got],
"local_input_sums": [int per training micro-batch], "saved_model": folder of save_model() or None,
"ref_cache_files": [names], "ref_forwards": int}}}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SETUPS = ("ddp", "zero2", "zero3", "fsdp2")
CASES = ("ref_model", "lora", "precompute", "grad_accum", "resume", "zero1")
STEPS = 4


def _fsdp2_on_cpu() -> None:
    """Let accelerate run its FSDP2 path on CPU processes (test harness only).

    ``AcceleratorState`` enables FSDP only for accelerator device types (``MULTI_GPU``, ...); on ``MULTI_CPU`` it
    drops the plugin and runs DDP. Here the state keeps the FSDP plugin the ``Trainer`` passes and reports
    ``DistributedType.FSDP``, exactly what it does on a GPU machine; everything after that is accelerate's code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def _recording(cls: type) -> type:
    """``cls`` recording what each training step received and counting reference forwards of the precompute."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training:
                self.recorded_wrapped.append(type(model).__name__)
                self.recorded_inputs.append(int(inputs["input_ids"].sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

        def compute_ref_log_probs(self, *args, **kwargs):
            type(self).ref_forwards += 1
            return super().compute_ref_log_probs(*args, **kwargs)

    Recording.__name__ = cls.__name__
    Recording.ref_forwards = 0
    return Recording


def _ds_config(stage: int) -> dict[str, Any]:
    return {
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 50_000,
            "allgather_bucket_size": 50_000,
            "stage3_param_persistence_threshold": 640,
            "stage3_prefetch_bucket_size": 50_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _full_params(trainer: Any) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the trained policy, full and fp32 (gathered under ZeRO-3 / FSDP2)."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().clone()
        elif type(p).__name__ == "DTensor":
            out[name] = p.full_tensor().detach().float().clone()
        else:
            out[name] = p.detach().float().clone()
    return out


def run_case(setup: str, case: str, trainer_name: str, data: Path, eval_data: Path, out_dir: Path) -> dict[str, Any]:
    import datasets
    from helpers import dpo_config, dpo_trainer, json_rows
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer
    from fastdpo.tiny import make_tokenizer

    datasets.disable_progress_bars()
    cls = _recording(FastDPOTrainer if trainer_name == "fast" else DPOTrainer)
    tok = make_tokenizer()
    peft = case == "lora"
    with_ref = case in ("ref_model", "grad_accum", "zero1")
    peft_config = (
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
        )
        if peft
        else None
    )
    run_dir = out_dir / f"{setup}-{case}-{trainer_name}"
    extra: dict[str, Any] = {}
    if setup == "zero2":  # the zero1 case: the same launch, ZeRO stage 1
        extra["deepspeed"] = _ds_config(1 if case == "zero1" else 2)
    elif setup == "fsdp2":
        extra["fsdp"] = True
        extra["fsdp_config"] = {
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        }
    resume = case == "resume"

    def make_args() -> Any:
        return dpo_config(
            run_dir,
            per_device_train_batch_size=2,
            max_steps=STEPS,
            learning_rate=0.5 if peft else 0.02,
            save_strategy="steps" if resume else "no",
            save_steps=2,
            gradient_checkpointing=case == "grad_accum",
            per_device_eval_batch_size=2,
            precompute_ref_log_probs=case in ("precompute", "resume"),
            precompute_ref_batch_size=2,
            gradient_accumulation_steps=2 if case == "grad_accum" else 1,
            max_grad_norm=1.0,
            **extra,
        )

    args = make_args()
    # Loaded after the DPOConfig exists, as a TRL user's script does: under the ZeRO-3 launcher config
    # (zero3_init_flag: true) from_pretrained then builds the model already partitioned (deepspeed.zero.Init).
    model = AutoModelForCausalLM.from_pretrained(
        str(out_dir / "policy"), dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    ref = (
        AutoModelForCausalLM.from_pretrained(
            str(out_dir / "reference"), dtype=torch.float32, attn_implementation="eager"
        )
        if with_ref
        else None
    )
    cache_dir = out_dir / f"hf_cache-{setup}-{case}-{trainer_name}"
    train = json_rows(data, cache_dir)
    evaluate = case == "ref_model"
    evals = json_rows(eval_data, cache_dir) if evaluate else None

    def make_trainer(m: Any, r: Any, args: Any) -> Any:
        trainer = dpo_trainer(cls, tok, m, r, args, train, evals, peft_config=peft_config)
        trainer.recorded_wrapped, trainer.recorded_inputs = [], []
        return trainer

    trainer = make_trainer(model, ref, args)
    torch.manual_seed(1234)
    trainer.train()
    result: dict[str, Any] = {}
    if resume:  # a fresh trainer (fresh model at its initial weights) resumes from the step-2 checkpoint
        result["uninterrupted_steps"] = _steps(trainer)
        result["uninterrupted_params"] = _full_params(trainer)
        forwards_before = cls.ref_forwards
        fresh = AutoModelForCausalLM.from_pretrained(
            str(out_dir / "policy"), dtype=torch.float32, attn_implementation="eager"
        )
        trainer = make_trainer(fresh.train(), None, make_args())  # a new run of the script
        result["resume_ref_forwards"] = cls.ref_forwards - forwards_before
        torch.manual_seed(1234)
        trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    eval_metrics = trainer.evaluate() if evaluate else None
    acc = trainer.accelerator
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    saved = None
    if case == "ref_model":  # the test process reloads it with AutoModelForCausalLM.from_pretrained
        saved = str(run_dir / "final")
        trainer.save_model(saved)
        acc.wait_for_everyone()
    cache_dir = run_dir / "fastdpo_ref_logps"
    result.update(
        {
            "eval": eval_metrics,
            "steps": _steps(trainer),
            "params": _full_params(trainer),
            "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "process_index": acc.process_index,
            "zero_stage": None if plugin is None else plugin.zero_stage,
            "fsdp_version": getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None),
            "wrapped": sorted(set(trainer.recorded_wrapped)),
            "local_input_sums": trainer.recorded_inputs,
            "saved_model": saved,
            "ref_cache_files": sorted(p.name for p in cache_dir.iterdir()) if cache_dir.is_dir() else [],
            "ref_forwards": cls.ref_forwards,
        }
    )
    acc.wait_for_everyone()
    return result


def _save_models(out_dir: Path, rank: int) -> None:
    """The seeded tiny Llama policy and reference (:mod:`fastdpo.tiny`) as pretrained folders, written by rank 0 (each
    rank waits for both folders: no process group exists yet)."""
    import time

    from fastdpo.tiny import make_model, make_tokenizer

    if rank == 0:
        tok = make_tokenizer()
        for name, seed in (("policy", 0), ("reference", 1)):
            make_model("llama", tok, attn_implementation="eager", seed=seed).save_pretrained(out_dir / f".{name}")
            os.replace(out_dir / f".{name}", out_dir / name)  # complete folders only
    deadline = time.monotonic() + 120
    while not all((out_dir / name).is_dir() for name in ("policy", "reference")):
        if time.monotonic() > deadline:
            raise SystemExit("rank 0 did not write the tiny models within 120 s")
        time.sleep(0.1)


def _steps(trainer: Any) -> list[dict[str, Any]]:
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", required=True, choices=SETUPS)
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    parser.add_argument("--data", required=True, help="JSON-lines preference rows (prompt, chosen, rejected)")
    parser.add_argument("--eval-data", required=True, help="rows for evaluate() (ref_model case)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.setup == "fsdp2":
        _fsdp2_on_cpu()
    rank = int(os.environ["RANK"])
    out_dir = Path(args.out)
    _save_models(out_dir, rank)
    results: dict[str, dict[str, Any]] = {}
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
        results[case] = {}
        names = ("fast",) if case == "resume" else ("trl", "fast")
        for trainer_name in names:  # an exception fails this rank; the launcher then stops its peer
            results[case][trainer_name] = run_case(
                args.setup, case, trainer_name, Path(args.data), Path(args.eval_data), out_dir
            )
    torch.save(results, out_dir / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
