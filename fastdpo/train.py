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
"""

from __future__ import annotations

import argparse
import contextlib
import math
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

from fastdpo.atomic import atomic_dir, remove_stale_tmp, remove_stale_tmp_in
from fastdpo.cli import UsageError, make_output_dir, report, resolve_device
from fastdpo.data import demo_data_files, pretokenize, read_preference_file, row_texts, split_rows
from fastdpo.run_state import (
    CHECKPOINT_NAME,
    LOG_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    RUN_FILES,
    DataOrder,
    MetricsLog,
    find_checkpoint,
    first_eval_record,
    load_resumable,
    remove_run,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastdpo.tiny import build_tiny_model, train_tokenizer
from fastdpo.train_args import _check_args, build_parser


# ---------------------------------------------------------------------------------------------------- training
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def evaluate(
    engine,
    model: torch.nn.Module,
    collator,
    rows: list[dict[str, Any]],
    batch_size: int,
    device: torch.device,
    max_batches: int | None = None,
    autocast: torch.dtype | None = None,
    world: Any = None,
) -> dict[str, float]:
    """Held-out metrics: every engine metric (rewards/accuracies, rewards/margins, ...) and the loss, averaged over
    pairs (each batch weighted by its pair count). Runs under ``torch.no_grad`` with the model in eval mode (and
    under ``torch.autocast(dtype=autocast)`` when given). With a multi-process ``world``
    (:mod:`fastdpo.train_parallel`) each process evaluates its contiguous share of ``rows`` (``max_batches`` per
    process) and the sums are added over the processes; with fewer rows than processes every process evaluates all.
    Token-level metrics (``logits/*``, ``entropy``, ``mean_token_accuracy``) are token means per batch, so, as across
    batches, their held-out value is the pair-weighted mean of those batch means."""
    from fastdpo import train_parallel as tp

    if world is not None and world.distributed and len(rows) >= world.size:
        rows = tp.shard(rows, world)
    else:
        world = None
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    seen = 0
    try:
        with torch.no_grad():
            for b, start in enumerate(range(0, len(rows), batch_size)):
                if max_batches is not None and b >= max_batches:
                    break
                chunk = rows[start : start + batch_size]
                with _autocast(device, autocast):
                    loss, metrics = engine.step(_to_device(collator(chunk), device))
                n = len(chunk)
                seen += n
                totals["loss"] = totals.get("loss", 0.0) + _scalar(loss) * n
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + _scalar(value) * n
    finally:
        model.train(was_training)
    if world is not None:
        keys = list(totals)  # the same order on every process (same engine, same metrics)
        summed = tp.all_sum(
            torch.tensor([totals[k] for k in keys] + [float(seen)], dtype=torch.float64, device=device), world
        ).tolist()
        totals, seen = dict(zip(keys, summed[:-1])), int(summed[-1])
    return {f"eval_{k}": v / max(seen, 1) for k, v in totals.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return fn


def _format(record: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [f"step {record['step']}"]
    for k in keys:
        if k in record:
            parts.append(f"{k} {record[k]:.4f}")
    return " | ".join(parts)


def _load_data(args: argparse.Namespace) -> tuple[list[dict], list[str], list[dict], list[str], str]:
    """(train rows, where each is, held-out rows, where each is, description) from --data/--eval-data/
    --eval-fraction or the demo set; ``UsageError`` naming the flag, file and row for bad input."""

    def read(flag: str, path: str | os.PathLike) -> tuple[list[dict], list[str]]:
        try:
            return read_preference_file(path)
        except FileNotFoundError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        except (ValueError, ImportError, OSError) as exc:
            raise UsageError(f"{flag} {exc}") from None

    if args.data is None:
        train_file, eval_file = demo_data_files()
        train_rows, train_where = read("--data", train_file)
        eval_rows, eval_where = read("--eval-data", args.eval_data or eval_file)
        data_desc = f"bundled demo set ({len(train_rows)} train / {len(eval_rows)} held-out pairs)"
    else:
        train_rows, train_where = read("--data", args.data)
        if args.eval_data:
            eval_rows, eval_where = read("--eval-data", args.eval_data)
        else:
            try:
                train_rows, train_where, eval_rows, eval_where = split_rows(
                    train_rows, train_where, args.eval_fraction, args.seed
                )
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        data_desc = f"{args.data} ({len(train_rows)} train / {len(eval_rows)} held-out pairs)"
    if ("prompt_input_ids" in train_rows[0]) != ("prompt_input_ids" in eval_rows[0]):
        raise UsageError("--data and --eval-data must both be pre-tokenized or both text")
    return train_rows, train_where, eval_rows, eval_where, data_desc


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: the run stops (exit code 1) without writing it."""


def _nonfinite(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters holding NaN or infinity."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def _tiny_model_bytes(tokenizer, args: argparse.Namespace) -> int:
    """Memory a tiny-model run needs for its weights: policy + reference + gradients + two AdamW states."""
    with torch.device("meta"):
        model = build_tiny_model(
            tokenizer, args.arch, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed
        )
    params = sum(p.numel() for p in model.parameters())
    return 5 * params * 4


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


_RESUME_MUST_MATCH = ("steps", "seed", "dtype", "grad_accum", "lora_r", "qlora")


def _build_policy(args: argparse.Namespace, source: str, dtype: torch.dtype, device: torch.device):
    """The policy (full model, or a PEFT LoRA model over a dense / 4-bit frozen base) and the reference
    (``(ref_model, mode)``: a separate frozen copy, or ``None, "adapter"`` for LoRA)."""
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--model {source}: cannot load the model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    for module in base.modules():  # like TRL's disable_dropout default
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.lora_r is None and not args.qlora:
        ref_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        for module in ref_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        ref_model.to(device).eval().requires_grad_(False)
        return base.to(device).train(), ref_model, "model"
    from peft import LoraConfig, get_peft_model

    from fastdpo.quantize import quantize_model

    if args.qlora:
        base = quantize_model(base.to(device), bits=4, compute_dtype=dtype)
    else:
        base = base.to(device)
    base.requires_grad_(False)
    r = args.lora_r or 16
    targets = args.lora_target_modules or "all-linear"
    config = LoraConfig(
        r=r,
        lora_alpha=args.lora_alpha or 2 * r,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        policy = get_peft_model(base, config)
    except ValueError as exc:
        raise UsageError(f"--lora-target-modules {targets}: {str(exc).splitlines()[0]}") from None
    for p in policy.parameters():  # the adapter trains in fp32 whatever the base's dtype
        if p.requires_grad and p.dtype != torch.float32 and dtype == torch.float32:
            p.data = p.data.float()
    return policy.train(), None, "adapter"


def _trainable_state(policy: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the policy: every weight, or only the adapter's (the base is rebuilt from its
    folder)."""
    if not lora:
        return policy.state_dict()
    return {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}


def _load_trainable_state(policy: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    if not lora:
        policy.load_state_dict(state)
        return
    params = dict(policy.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise ValueError(f"adapter weights differ: checkpoint has {len(state)}, this run {len(wanted)}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _train(args: argparse.Namespace, staged: list[Path]) -> int:
    from fastdpo import train_parallel as tp

    _check_args(args)
    device = resolve_device("--device", args.device)
    out = Path(args.output_dir)
    make_output_dir("--output-dir", out)
    world, device = tp.setup(device)
    try:
        return _run(args, staged, out, device, world)
    finally:
        tp.teardown(world)


def _run(args: argparse.Namespace, staged: list[Path], out: Path, device: torch.device, world) -> int:
    from fastdpo import train_parallel as tp

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
    ckpt_path, prev_path = out / CHECKPOINT_NAME, out / PREVIOUS_CHECKPOINT_NAME
    ref_dir = out / "reference"
    staged_ref: Path | None = None
    checkpoint = None
    lora = args.lora_r is not None or args.qlora
    if args.resume:
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

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no per-load "Loading weights" bars: one progress bar, ours
    amp = torch.float16 if args.dtype == "float16" else None  # fp16: fp32 master weights + autocast + loss scaling
    dtype = torch.float32 if amp is not None else getattr(torch, args.dtype)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_rows, train_where, eval_rows, eval_where, data_desc = _load_data(args)

    # model, reference, tokenizer: the reference is the initial policy (for a tiny model, its initial weights are
    # saved under reference/ so that --resume rebuilds the very same reference)
    if args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            raise UsageError(
                f"--model {args.model}: not a local model folder (no config.json there); fastdpo train "
                "loads save_pretrained folders and downloads nothing"
            )
        ref_source = args.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"--model {args.model}: cannot load its tokenizer ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    elif args.resume and (ref_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(ref_dir)
        ref_source = str(ref_dir)
    else:
        if "prompt_input_ids" in train_rows[0]:
            raise UsageError("pre-tokenized rows need --model (its tokenizer produced the ids)")
        tokenizer = train_tokenizer([t for r in train_rows for t in row_texts(r)], vocab_size=args.vocab_size)
        need = _tiny_model_bytes(tokenizer, args)
        import psutil

        available = psutil.virtual_memory().available
        if device.type == "cpu" and need * world.size > available:
            raise UsageError(
                f"--hidden-size {args.hidden_size} --layers {args.layers}: the tiny model's weights, "
                f"gradients and optimizer need ~{need * world.size / 2**30:.1f} GiB, "
                f"{available / 2**30:.1f} GiB available"
            )
        # staged under a temporary name (the main process's pid) and put in place only once the whole setup
        # succeeded (with --overwrite, the earlier run stays intact until then)
        staged_ref = out / f".reference.{_main_pid(world)}.tmp"
        if world.main:
            shutil.rmtree(staged_ref, ignore_errors=True)
            staged.append(staged_ref)
            init = build_tiny_model(
                tokenizer, args.arch, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed
            )
            init.save_pretrained(staged_ref)
            tokenizer.save_pretrained(staged_ref)
            del init
        tp.barrier(world)
        ref_source = str(staged_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    policy, ref_model, reference = _build_policy(args, ref_source, dtype, device)

    engine_kwargs: dict[str, Any] = {
        "loss_type": args.loss_type if len(args.loss_type) > 1 else args.loss_type[0],
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "grad_in_forward": args.grad_in_forward,
    }
    if args.loss_weights is not None:
        engine_kwargs["loss_weights"] = args.loss_weights
    try:
        engine = DPOEngine(policy, ref_model, reference=reference, **engine_kwargs)
    except (ValueError, TypeError) as exc:  # e.g. an unknown --loss-type, exo_pair without --label-smoothing
        raise UsageError(f"--loss-type {' '.join(args.loss_type)}: {exc}") from None
    collator = PreferenceCollator(
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation_mode=args.truncation_mode,
        packing=args.packing,
    )
    # tokenize once up front (collating pre-tokenized rows gives the same batches, minus per-step tokenization)
    try:
        train_rows = pretokenize(collator, train_rows, train_where)
        eval_rows = pretokenize(collator, eval_rows, eval_where)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    global_batch = args.batch_size * world.size
    if len(train_rows) < world.size:
        raise UsageError(f"--data has {len(train_rows)} training pairs, fewer than the {world.size} processes")
    tp.barrier(world)  # every process set up: only now is anything of an earlier run replaced
    if world.main:
        if args.overwrite:
            remove_run(out)
        if staged_ref is not None:
            shutil.rmtree(ref_dir, ignore_errors=True)
            os.replace(staged_ref, ref_dir)
    tp.barrier(world)
    if lora:  # where the saved adapter's base lives: --model, or the initial tiny model under reference/
        base_path = Path(args.model) if args.model is not None else ref_dir
        policy.peft_config["default"].base_model_name_or_path = str(base_path.resolve())

    lr = (
        args.lr
        if args.lr is not None
        else (1e-6 if args.model is not None and not lora else 3e-3 if args.model is None else 1e-4)
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(args.lr_schedule, args.warmup_steps, args.steps)
    )
    scaler = torch.amp.GradScaler(device.type) if amp is not None else None
    order = DataOrder(len(train_rows), global_batch, args.seed)
    step = 0
    if checkpoint is not None:
        try:
            order.load_state_dict(checkpoint["data_order"])
            _load_trainable_state(policy, checkpoint["model"], lora)
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UsageError(
                f"--resume: the checkpoint does not fit this run ({str(exc).splitlines()[0]}; same "
                "--data, --batch-size and number of processes?)"
            ) from None
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        step = int(checkpoint["step"])
        set_rng_state(checkpoint["rng"])

    ddp = None
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    gathers: dict[str, Any] = {}
    if world.distributed:
        gathers = {"gather": lambda t: tp.gather_cat(t, world)}

    saved_step = step if checkpoint is not None else -1

    def checkpoint_now() -> None:
        bad = _nonfinite(policy)
        if bad:  # the guarded step never applies a non-finite update; whatever the cause, never write such weights
            raise NonFiniteError(
                f"the policy holds non-finite values at step {step} ({bad[0]}, ...); no checkpoint or model written"
            )
        if world.main:
            state = {
                "model": _trainable_state(policy, lora),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data_order": order.state_dict(),
                "step": step,
                "rng": rng_state(),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_checkpoint(ckpt_path, state, previous=prev_path)
        tp.barrier(world)
        nonlocal saved_step
        saved_step = step

    log = MetricsLog(out / LOG_NAME, step if checkpoint is not None else None) if world.main else None
    board = None
    if args.report_to == "tensorboard" and world.main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(log_dir=str(out / "runs"), purge_step=step + 1 if checkpoint is not None else None)

    def record(entry: dict[str, Any]) -> None:
        if log is not None:
            log.write(entry)
        if board is not None:
            for key, value in entry.items():
                if key not in ("step", "skipped") and isinstance(value, (int, float)) and math.isfinite(value):
                    board.add_scalar(
                        key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}",
                        value,
                        entry["step"],
                    )
            board.flush()

    def say(text: str) -> None:
        if world.main:
            write(text)

    show = ("loss", "rewards/accuracies", "rewards/margins")
    eval_show = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    mode = (
        f"LoRA r={policy.peft_config['default'].r}" + (" over a 4-bit base (QLoRA)" if args.qlora else "")
        if lora
        else "full fine-tuning"
    )
    if world.main:
        print(
            f"fastdpo train: {type(engine.policy_parts.hf_model).__name__} "
            f"({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params, {mode}) on {device}"
            + (f" x {world.size} processes" if world.distributed else "")
            + f", {data_desc}, loss {args.loss_type}, beta {args.beta}, packing {args.packing}, {args.steps} steps "
            f"of {args.batch_size * args.grad_accum * world.size} pairs"
            + (f", resuming at step {step}" if step else ""),
            flush=True,
        )

    def run_eval() -> dict[str, Any]:
        rng = rng_state()  # evaluation must not perturb the training RNG stream
        entry = {
            "step": step,
            **evaluate(
                engine,
                policy,
                collator,
                eval_rows,
                args.eval_batch_size,
                device,
                args.eval_batches,
                autocast=amp,
                world=world,
            ),
        }
        set_rng_state(rng)
        record(entry)
        return entry

    write = print
    first_eval = None
    if step == 0:
        first_eval = run_eval()
        say(_format(first_eval, eval_show))

    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _is_main_thread() else {}
    bar = None
    if not args.no_progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="fastdpo train", dynamic_ncols=True, file=sys.stderr)
        write = bar.write
    start_step, t0 = step, time.perf_counter()
    last_eval: dict[str, Any] | None = None
    nonfinite_stop: str | None = None
    try:
        while step < args.steps:
            totals: dict[str, float] = {}
            pairs_seen = 0
            bad = None
            bad_value = float("nan")
            for micro in range(args.grad_accum):
                rows = order.next_batch()
                while len(rows) < world.size:  # an epoch's tail too small to give every process a pair
                    rows = order.next_batch()
                mine = [train_rows[i] for i in tp.shard(rows, world)]
                batch = _to_device(collator(mine), device)
                sync = contextlib.nullcontext() if ddp is None or micro == args.grad_accum - 1 else ddp.no_sync()
                with sync:
                    with _autocast(device, amp):
                        loss, metrics = engine.step(batch, ddp, **gathers)
                    finite = math.isfinite(_scalar(loss))
                    if tp.any_true(not finite, world, device):  # every process skips the backward together
                        bad, bad_value = "loss", _scalar(loss)
                        break
                    scaled = loss * (tp.loss_scale(len(mine), len(rows), world) / args.grad_accum)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                pair_loss = float(tp.all_sum(loss.detach().float().reshape(1) * len(mine), world)) / len(rows)
                totals["loss"] = totals.get("loss", 0.0) + pair_loss * len(rows)
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + _scalar(value) * len(rows)
                pairs_seen += len(rows)
            loss_value = totals["loss"] / pairs_seen if bad is None else bad_value
            grad_norm = None
            skipped = False
            if bad is None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                    )
                )
                if not math.isfinite(grad_norm) and scaler is None:
                    bad = "gradient"
            lr = scheduler.get_last_lr()[0]
            if bad is None:
                if scaler is not None:  # an fp16 overflow makes the scaler skip the step and lower the scale
                    scale = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    skipped = scaler.get_scale() < scale
                else:
                    optimizer.step()
                if not skipped:
                    scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            entry = {
                "step": step,
                "epoch": order.epoch + order.cursor / order.num_rows,
                "loss": loss_value,
                "lr": lr,
                **({k: v / pairs_seen for k, v in totals.items() if k != "loss"} if bad is None else {}),
            }
            if grad_norm is not None:
                entry["grad_norm"] = grad_norm
            if scaler is not None:
                entry["loss_scale"] = scaler.get_scale()
            if bad is not None or skipped:
                entry["skipped"] = True
            record(entry)
            if bad is not None and args.on_nonfinite == "stop":
                nonfinite_stop = f"non-finite {bad} ({loss_value if bad == 'loss' else grad_norm}) at step {step}"
                break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry.get('rewards/accuracies', float('nan')):.2f}")
            if args.log_every and step % args.log_every == 0:
                say(_format(entry, show))
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                last_eval = run_eval()
                say(_format(last_eval, eval_show))
            interrupted = tp.any_true(interrupted, world, device)  # a signal to any process stops them all
            stop_now = interrupted or (args.stop_after is not None and step - start_step >= args.stop_after)
            if (args.save_every and step % args.save_every == 0) or stop_now:
                checkpoint_now()
            if stop_now:
                break
    finally:
        if bar is not None:
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    def close_logs() -> None:
        if log is not None:
            log.close()
        if board is not None:
            board.close()

    if nonfinite_stop is not None:
        close_logs()
        if world.main:
            last = f"the last checkpoint ({ckpt_path}) is from before it" if ckpt_path.exists() else "no checkpoint"
            hint = "lower --lr" + (", use --dtype float32" if args.dtype != "float32" else "")
            print(
                f"fastdpo train: {nonfinite_stop}; stopped without an optimizer step or a model ({last}); {hint}, "
                "or pass --on-nonfinite skip",
                file=sys.stderr,
            )
        return 1
    if step < args.steps:
        close_logs()
        why = "interrupted" if interrupted else f"stopped after {args.stop_after} steps"
        if world.main:
            print(f"{why} at step {step}/{args.steps}; checkpoint written to {ckpt_path} (continue with --resume)")
        return 130 if interrupted else 0

    if saved_step != step:
        checkpoint_now()
    last_eval = run_eval()
    close_logs()
    elapsed = time.perf_counter() - t0
    model_dir = out / "model"
    if world.main:
        print(_format(last_eval, eval_show) + f" | {step - start_step} steps in {elapsed:.1f}s")
        first_eval = first_eval or first_eval_record(out / LOG_NAME)
        if first_eval is not None:
            print(
                f"held-out rewards/accuracies: {first_eval.get('eval_rewards/accuracies', float('nan')):.3f} before "
                f"training -> {last_eval.get('eval_rewards/accuracies', float('nan')):.3f} after (chance: 0.5; "
                "before training policy == reference, rewards are ~0 and ties count as wrong, as in TRL)"
            )
        from fastdpo.model_card import write_model_card

        base = str(Path(args.model).resolve()) if args.model is not None else str(ref_dir.resolve())
        with atomic_dir(model_dir) as tmp_model:  # model/ appears complete or not at all
            policy.save_pretrained(tmp_model)
            tokenizer.save_pretrained(tmp_model)
            write_model_card(
                tmp_model,
                name=out.resolve().name,
                location=str(model_dir.resolve()),
                base=base,
                adapter=("qlora" if args.qlora else "lora") if lora else None,
                settings=_card_settings(args, world, reference, lr),
                metrics_before={k: v for k, v in (first_eval or {}).items() if k != "step"},
                metrics_after={k: v for k, v in last_eval.items() if k != "step"},
            )
        print(f"model written to {model_dir.resolve()}")
    tp.barrier(world)
    return 0


def _card_settings(args: argparse.Namespace, world, reference: str, lr: float) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "loss_type": args.loss_type,
        "loss_weights": args.loss_weights or "-",
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "packing": args.packing,
        "grad_in_forward": args.grad_in_forward,
        "reference": "base model, adapter disabled" if reference == "adapter" else "frozen copy of the initial model",
        "max_length": args.max_length or "-",
        "truncation_mode": args.truncation_mode,
        "steps": args.steps,
        "batch_size (pairs per micro-batch and process)": args.batch_size,
        "grad_accum": args.grad_accum,
        "processes": world.size,
        "learning_rate": lr,
        "lr_schedule": args.lr_schedule,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    if args.lora_r is not None or args.qlora:
        settings.update(
            {"lora_r": args.lora_r or 16, "lora_alpha": args.lora_alpha or 2 * (args.lora_r or 16), "qlora": args.qlora}
        )
    return settings


def _main_pid(world) -> int:
    """The main process's pid, the same on every process (names the staged reference folder)."""
    if not world.distributed:
        return os.getpid()
    import torch.distributed as dist

    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
