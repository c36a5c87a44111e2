"""``fastdpo train``: DPO training from a local model (or a tiny model built in-process) on a local preference file.

Examples::

    fastdpo train                                   # tiny Llama + in-process tokenizer on the bundled demo set
    fastdpo train --model ./my-model --data prefs.jsonl --eval-data held_out.jsonl --output-dir runs/a
    fastdpo train --model ./my-model --data prefs.jsonl --lora-r 16 --grad-accum 4 --report-to tensorboard
    fastdpo train --model ./my-model --data prefs.jsonl --qlora --packing prefix_shared --max-length 2048
    torchrun --nproc-per-node 2 -m fastdpo.cli train --model ./my-model --data prefs.jsonl   # DDP, one process/GPU
    fastdpo train --output-dir runs/a --resume      # continue an interrupted run exactly where it stopped

What it trains: every weight (the reference is a frozen copy of the initial model), or with ``--lora-r`` a LoRA
adapter (peft; the reference is the same model with the adapter disabled, no second copy), or with ``--qlora`` a LoRA
adapter over the base quantized to 4-bit NF4 by bitsandbytes (frozen; :func:`fastdpo.quantize.quantize_model`).
Batches: ``--batch-size`` pairs per micro-batch and process, ``--grad-accum`` micro-batches per optimizer step,
truncation as TRL (``--max-length``, ``--max-prompt-length``, ``--max-completion-length``, ``--truncation-mode``), any
packing, loss mixtures (``--loss-type A B --loss-weights wA wB``), ``--grad-in-forward``. ``--report-to tensorboard``
writes the metrics as TensorBoard scalars under ``runs/``. Under ``torchrun`` (``WORLD_SIZE > 1``) the processes train
one DDP model (gloo on CPU, nccl on GPU, :mod:`fastdpo.train_parallel`): each optimizer step's global batch is split
over them, the losses are weighted so the result equals one process on the whole batch, the main process writes the
log, checkpoints and the model.

Outputs under ``--output-dir``: ``metrics.jsonl`` (one JSON record per optimizer step and per evaluation),
``checkpoint.pt`` (model -- only the adapter's weights for LoRA --, optimizer, scheduler, loss scaler, RNG states,
step and data order; replaced atomically and checksummed) with the checkpoint before it kept as
``checkpoint.prev.pt``, ``reference/`` (the frozen reference model and tokenizer; for a tiny model it is the initial
weights), ``runs/`` (TensorBoard events, with ``--report-to tensorboard``) and ``model/`` (the final model -- or the
LoRA adapter, whose ``adapter_config.json`` names its base folder -- with the tokenizer and a model card
``README.md`` (:mod:`fastdpo.model_card`), ``save_pretrained`` format, loadable with ``from_pretrained`` / peft's
``AutoPeftModelForCausalLM``; it appears only complete and finite). The last line printed says where the model was
written.

Reliability:

* An output folder holding an earlier run is refused unless ``--resume`` (continue it) or ``--overwrite`` (start
  over: the earlier run's files are deleted).
* ``--resume`` verifies the checkpoint's checksum; a missing, empty, truncated or corrupt ``checkpoint.pt`` falls back
  to ``checkpoint.prev.pt`` with a warning (the bad file is kept aside as ``checkpoint.pt.corrupt``). A partial last
  line of ``metrics.jsonl`` (a crash mid-write) is dropped. Temporary files of killed writers are deleted at start.
* A non-finite loss or gradient stops the run (exit code 1) before the optimizer step, so no NaN reaches the weights,
  a checkpoint or ``model/``; ``--on-nonfinite skip`` instead skips such steps (logged with ``"skipped": true``).
  ``--dtype float16`` trains with fp32 weights and optimizer under fp16 autocast with dynamic loss scaling
  (``torch.amp.GradScaler``): pure fp16 AdamW underflows (its ``eps`` and squared gradients) and turns the loss NaN
  from the second step.
* Usage errors (bad arguments, missing or malformed files) are one line on stderr and exit code 2.

This module is the command, step by step (:func:`main`); its arguments are :mod:`fastdpo.train_args`, the setup
(data, tokenizer, policy and reference, engine, optimizer) :mod:`fastdpo.train_setup`, the optimizer step, evaluation,
checkpoints and records :mod:`fastdpo.train_loop`, a run's files :mod:`fastdpo.run_state`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdpo import train_parallel as tp
from fastdpo.atomic import atomic_dir, remove_stale_tmp, remove_stale_tmp_in
from fastdpo.cli import UsageError, make_output_dir, report, resolve_device
from fastdpo.data import pretokenize
from fastdpo.run_state import (
    LOG_NAME,
    RUN_FILES,
    DataOrder,
    find_checkpoint,
    first_eval_record,
    load_resumable,
    remove_run,
)
from fastdpo.train_args import _check_args, build_parser, lora_rank_alpha, uses_lora
from fastdpo.train_loop import EVAL_SHOW, SHOW, NonFiniteError, Reporter, Run, format_record
from fastdpo.train_setup import build_collator, build_engine, build_optimizer, build_policy, load_data, load_tokenizer

__all__ = ["build_parser", "main"]

_RESUME_MUST_MATCH = ("steps", "seed", "dtype", "grad_accum", "lora_r", "qlora")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastdpo train``; returns the process exit code (0 done, 1 stopped on a non-finite loss,
    130 interrupted, 2 usage error)."""
    args = build_parser().parse(list(sys.argv[1:] if argv is None else argv))
    if isinstance(args, int):
        return args
    staged: list[Path] = []  # temporary folders of this run, removed however it ends
    try:
        return _train(args, staged)
    except UsageError as exc:
        return report("fastdpo train", exc)
    except NonFiniteError as exc:
        print(f"fastdpo train: {exc}", file=sys.stderr)
        return 1
    finally:
        for path in staged:
            shutil.rmtree(path, ignore_errors=True)


def _train(args: argparse.Namespace, staged: list[Path]) -> int:
    _check_args(args)
    device = resolve_device("--device", args.device)
    out = Path(args.output_dir)
    make_output_dir("--output-dir", out)
    world, device = tp.setup(device)
    try:
        return _run(args, staged, out, device, world)
    finally:
        tp.teardown(world)


def _run(args: argparse.Namespace, staged: list[Path], out: Path, device: torch.device, world: tp.World) -> int:
    """The run, step by step: the output folder, the checkpoint to resume, the setup, the loop, the end."""
    _check_output_dir(args, out, world)
    checkpoint = _resume_checkpoint(args, out, world) if args.resume else None
    run, data_desc = _setup(args, staged, out, device, world)
    if checkpoint is not None:
        run.restore(checkpoint)
    run.wrap_distributed()
    reporter = Reporter(args, out, world, run.step if checkpoint is not None else None)
    _announce(run, data_desc)
    first_eval = None
    if run.step == 0:
        first_eval = _evaluate(run, reporter)
    start_step, t0 = run.step, time.perf_counter()
    nonfinite_stop, interrupted = _loop(run, reporter)
    if nonfinite_stop is not None or run.step < args.steps:
        reporter.close()
        return _stopped(run, nonfinite_stop, interrupted)
    if run.saved_step != run.step:
        run.save_checkpoint()
    last_eval = run.evaluate()
    reporter.record(last_eval)
    reporter.close()
    if world.main:
        elapsed = time.perf_counter() - t0
        print(format_record(last_eval, EVAL_SHOW) + f" | {run.step - start_step} steps in {elapsed:.1f}s")
        _save_model(run, first_eval or first_eval_record(out / LOG_NAME), last_eval)
    tp.barrier(world)
    return 0


def _check_output_dir(args: argparse.Namespace, out: Path, world: tp.World) -> None:
    """Delete killed writers' temporary files (main process); refuse a folder holding an earlier run unless
    ``--resume`` or ``--overwrite``."""
    if world.main:
        for name in RUN_FILES:  # killed writers' temporary files, including fastdpo <= 0.1's random names
            remove_stale_tmp(out / name)
        remove_stale_tmp_in(out)
    tp.barrier(world)
    earlier = [name for name in RUN_FILES[:5] if (out / name).exists()]
    if earlier and not (args.resume or args.overwrite):
        raise UsageError(
            f"--output-dir {out} holds an earlier run ({', '.join(earlier)}): pass --resume to continue "
            "it or --overwrite to start over"
        )


def _resume_checkpoint(args: argparse.Namespace, out: Path, world: tp.World) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues (the same on every process), checked to come from a run with the same
    ``--steps``, ``--seed``, ``--dtype``, ``--grad-accum``, ``--lora-r`` and ``--qlora``."""
    if world.main:
        checkpoint = find_checkpoint(out)
    tp.barrier(world)  # the main process moved a damaged newest checkpoint aside; the others read the same one
    if not world.main:
        checkpoint = load_resumable(out)
    saved = checkpoint["args"]
    differ = [k for k in _RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
    if differ:
        raise UsageError(
            "--resume needs the same "
            + ", ".join(f"--{k.replace('_', '-')}" for k in differ)
            + " as the interrupted run (checkpoint: "
            + ", ".join(f"{k}={saved[k]}" for k in differ)
            + ")"
        )
    return checkpoint


def _setup(
    args: argparse.Namespace, staged: list[Path], out: Path, device: torch.device, world: tp.World
) -> tuple[Run, str]:
    """``(the run at step 0, a description of its data)``: data, tokenizer, policy and reference, engine, collator
    (rows tokenized once up front), optimizer and data order (:mod:`fastdpo.train_setup`). Only once every process
    succeeded is anything of an earlier run replaced (``--overwrite``) and the staged tiny reference put in place."""
    from transformers.utils import logging as hf_logging

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no per-load "Loading weights" bars: one progress bar, ours
    # float16: fp32 master weights + autocast + loss scaling (Run.amp)
    dtype = torch.float32 if args.dtype == "float16" else getattr(torch, args.dtype)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_rows, train_where, eval_rows, eval_where, data_desc = load_data(args)
    tokenizer, ref_source, staged_ref = load_tokenizer(args, out, train_rows, device, world, staged)
    policy, ref_model, reference = build_policy(args, ref_source, dtype, device)
    engine = build_engine(args, policy, ref_model, reference)
    collator = build_collator(args, tokenizer)
    # tokenize once up front (collating pre-tokenized rows gives the same batches, minus per-step tokenization)
    try:
        train_rows = pretokenize(collator, train_rows, train_where)
        eval_rows = pretokenize(collator, eval_rows, eval_where)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if len(train_rows) < world.size:
        raise UsageError(f"--data has {len(train_rows)} training pairs, fewer than the {world.size} processes")
    tp.barrier(world)  # every process set up: only now is anything of an earlier run replaced
    ref_dir = out / "reference"
    if world.main:
        if args.overwrite:
            remove_run(out)
        if staged_ref is not None:
            shutil.rmtree(ref_dir, ignore_errors=True)
            os.replace(staged_ref, ref_dir)
    tp.barrier(world)
    lora = uses_lora(args)
    if lora:  # where the saved adapter's base lives: --model, or the initial tiny model under reference/
        base_path = Path(args.model) if args.model is not None else ref_dir
        policy.peft_config["default"].base_model_name_or_path = str(base_path.resolve())
    optim = build_optimizer(args, policy, lora, device)
    order = DataOrder(len(train_rows), args.batch_size * world.size, args.seed)
    run = Run(args, device, world, policy, reference, tokenizer, engine, collator, train_rows, eval_rows, optim, order)
    return run, data_desc


def _announce(run: Run, data_desc: str) -> None:
    """The first line (main process): model, size, mode, device, processes, data, loss, packing, steps, resume."""
    args, world = run.args, run.world
    if not world.main:
        return
    mode = (
        f"LoRA r={run.policy.peft_config['default'].r}" + (" over a 4-bit base (QLoRA)" if args.qlora else "")
        if run.lora
        else "full fine-tuning"
    )
    print(
        f"fastdpo train: {type(run.engine.policy_parts.hf_model).__name__} "
        f"({sum(p.numel() for p in run.policy.parameters()) / 1e6:.2f}M params, {mode}) on {run.device}"
        + (f" x {world.size} processes" if world.distributed else "")
        + f", {data_desc}, loss {args.loss_type}, beta {args.beta}, packing {args.packing}, {args.steps} steps "
        f"of {args.batch_size * args.grad_accum * world.size} pairs"
        + (f", resuming at step {run.step}" if run.step else ""),
        flush=True,
    )


def _evaluate(run: Run, reporter: Reporter) -> dict[str, Any]:
    """Evaluate now, record it and print its line."""
    entry = run.evaluate()
    reporter.record(entry)
    reporter.say(format_record(entry, EVAL_SHOW))
    return entry


def _loop(run: Run, reporter: Reporter) -> tuple[str | None, bool]:
    """Optimizer steps until ``--steps``, a non-finite loss or gradient under ``--on-nonfinite stop``, ``--stop-after``
    steps of this invocation, or SIGINT/SIGTERM (on any process; the run checkpoints and stops after the current step,
    a second signal stops it at once). Returns ``(what was non-finite and where, or None; interrupted)``."""
    args, world = run.args, run.world
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _is_main_thread() else {}
    if not args.no_progress:
        reporter.open_bar(args.steps, run.step)
    start_step = run.step
    try:
        while run.step < args.steps:
            entry, bad = run.optimizer_step()
            reporter.record(entry)
            if bad is not None and args.on_nonfinite == "stop":
                value = entry["loss"] if bad == "loss" else entry["grad_norm"]
                return f"non-finite {bad} ({value}) at step {run.step}", interrupted
            reporter.advance(entry)
            if args.log_every and run.step % args.log_every == 0:
                reporter.say(format_record(entry, SHOW))
            if args.eval_every and run.step % args.eval_every == 0 and run.step < args.steps:
                _evaluate(run, reporter)
            interrupted = tp.any_true(interrupted, world, run.device)  # a signal to any process stops them all
            stop_now = interrupted or (args.stop_after is not None and run.step - start_step >= args.stop_after)
            if (args.save_every and run.step % args.save_every == 0) or stop_now:
                run.save_checkpoint()
            if stop_now:
                break
    finally:
        reporter.close_bar()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return None, interrupted


def _stopped(run: Run, nonfinite_stop: str | None, interrupted: bool) -> int:
    """Say why the run ended before ``--steps`` (main process); the exit code: 1 for a non-finite loss or gradient,
    130 interrupted, 0 after ``--stop-after`` steps."""
    args, ckpt_path = run.args, run.checkpoint_path
    if nonfinite_stop is not None:
        if run.world.main:
            last = f"the last checkpoint ({ckpt_path}) is from before it" if ckpt_path.exists() else "no checkpoint"
            hint = "lower --lr" + (", use --dtype float32" if args.dtype != "float32" else "")
            print(
                f"fastdpo train: {nonfinite_stop}; stopped without an optimizer step or a model ({last}); {hint}, "
                "or pass --on-nonfinite skip",
                file=sys.stderr,
            )
        return 1
    why = "interrupted" if interrupted else f"stopped after {args.stop_after} steps"
    if run.world.main:
        print(f"{why} at step {run.step}/{args.steps}; checkpoint written to {ckpt_path} (continue with --resume)")
    return 130 if interrupted else 0


def _save_model(run: Run, first_eval: dict[str, Any] | None, last_eval: dict[str, Any]) -> None:
    """Print the held-out accuracy before and after; write ``model/`` (weights or adapter, tokenizer, model card)
    atomically: it appears complete or not at all."""
    from fastdpo.model_card import write_model_card

    args, out = run.args, run.out
    if first_eval is not None:
        print(
            f"held-out rewards/accuracies: {first_eval.get('eval_rewards/accuracies', float('nan')):.3f} before "
            f"training -> {last_eval.get('eval_rewards/accuracies', float('nan')):.3f} after (chance: 0.5; "
            "before training policy == reference, rewards are ~0 and ties count as wrong, as in TRL)"
        )
    model_dir = out / "model"
    base = str(Path(args.model).resolve()) if args.model is not None else str((out / "reference").resolve())
    with atomic_dir(model_dir) as tmp_model:
        run.policy.save_pretrained(tmp_model)
        run.tokenizer.save_pretrained(tmp_model)
        write_model_card(
            tmp_model,
            name=out.resolve().name,
            location=str(model_dir.resolve()),
            base=base,
            adapter=("qlora" if args.qlora else "lora") if run.lora else None,
            settings=_card_settings(run),
            metrics_before={k: v for k, v in (first_eval or {}).items() if k != "step"},
            metrics_after={k: v for k, v in last_eval.items() if k != "step"},
        )
    print(f"model written to {model_dir.resolve()}")


def _card_settings(run: Run) -> dict[str, Any]:
    """The model card's settings table: the loss, data, optimization and precision of the run."""
    args = run.args
    settings: dict[str, Any] = {
        "loss_type": args.loss_type,
        "loss_weights": args.loss_weights or "-",
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "packing": args.packing,
        "grad_in_forward": args.grad_in_forward,
        "reference": "base model, adapter disabled"
        if run.reference == "adapter"
        else "frozen copy of the initial model",
        "max_length": args.max_length or "-",
        "truncation_mode": args.truncation_mode,
        "steps": args.steps,
        "batch_size (pairs per micro-batch and process)": args.batch_size,
        "grad_accum": args.grad_accum,
        "processes": run.world.size,
        "learning_rate": run.optim.lr,
        "lr_schedule": args.lr_schedule,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    if run.lora:
        r, alpha = lora_rank_alpha(args)
        settings.update({"lora_r": r, "lora_alpha": alpha, "qlora": args.qlora})
    return settings


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
