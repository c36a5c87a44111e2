"""The setup of a ``fastdpo train`` run: its data, tokenizer, policy and reference, engine, collator and optimizer.

Every step turns a bad input into a one-line :class:`fastdpo.cli.UsageError` naming the flag, before anything of an
earlier run in ``--output-dir`` is replaced. The reference is the initial policy: a frozen copy of ``--model``, the
``--model`` base with the LoRA adapter disabled, or, for the tiny in-process model, its initial weights saved under
``reference/`` (staged under a temporary name until the whole setup succeeded) so that ``--resume`` rebuilds the very
same reference. The run loop is :mod:`fastdpo.train_loop`, the command :mod:`fastdpo.train`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastdpo import train_parallel as tp
from fastdpo.cli import UsageError, first_line
from fastdpo.data import demo_data_files, read_preference_file, row_texts, split_rows
from fastdpo.tiny import build_tiny_model, train_tokenizer
from fastdpo.train_args import lora_rank_alpha, uses_lora

if TYPE_CHECKING:
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

__all__ = [
    "Optimization",
    "build_collator",
    "build_engine",
    "build_optimizer",
    "build_policy",
    "load_data",
    "load_tokenizer",
    "load_trainable_state",
    "lr_lambda",
    "trainable_state",
]


def load_data(args: argparse.Namespace) -> tuple[list[dict], list[str], list[dict], list[str], str]:
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


def _first_line(exc: BaseException) -> str:
    """``"<type>: <first line of the message>"`` of a loader's exception, for a one-line usage error."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def load_tokenizer(
    args: argparse.Namespace,
    out: Path,
    train_rows: list[dict],
    device: torch.device,
    world: tp.World,
    staged: list[Path],
) -> tuple[Any, str, Path | None]:
    """``(tokenizer, where the initial model is, staged reference folder or None)``: ``--model``'s tokenizer; on
    ``--resume`` of a tiny-model run the one saved under ``reference/``; else a tokenizer trained on the rows and the
    initial tiny model saved (by the main process) in a staged folder named after the main process's pid, appended to
    ``staged`` (removed however the run ends) and put in place as ``reference/`` by the caller once the setup
    succeeded. A tokenizer without a pad token pads with its eos token."""
    from transformers import AutoTokenizer

    ref_dir = out / "reference"
    staged_ref: Path | None = None
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
            raise UsageError(f"--model {args.model}: cannot load its tokenizer ({_first_line(exc)})") from None
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
    return tokenizer, ref_source, staged_ref


def _tiny_model_bytes(tokenizer, args: argparse.Namespace) -> int:
    """Memory a tiny-model run needs for its weights: policy + reference + gradients + two AdamW states."""
    with torch.device("meta"):
        model = build_tiny_model(
            tokenizer, args.arch, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed
        )
    params = sum(p.numel() for p in model.parameters())
    return 5 * params * 4


def _main_pid(world: tp.World) -> int:
    """The main process's pid, the same on every process (names the staged reference folder)."""
    if not world.distributed:
        return os.getpid()
    import torch.distributed as dist

    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _load_without_dropout(source: str, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(source)`` with every dropout probability 0 (TRL's
    ``disable_dropout`` default)."""
    from transformers import AutoModelForCausalLM

    from fastdpo.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    disable_dropout(model)
    return model


def build_policy(
    args: argparse.Namespace, source: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module | None, str]:
    """The policy (full model, or a PEFT LoRA model over a dense / 4-bit frozen base) and the reference
    (``(ref_model, mode)``: a separate frozen copy, or ``None, "adapter"`` for LoRA)."""
    try:
        base = _load_without_dropout(source, dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--model {source}: cannot load the model ({_first_line(exc)})") from None
    if not uses_lora(args):
        ref_model = _load_without_dropout(source, dtype)
        ref_model.to(device).eval().requires_grad_(False)
        return base.to(device).train(), ref_model, "model"
    from peft import LoraConfig, get_peft_model

    from fastdpo.quantize import quantize_model

    if args.qlora:
        base = quantize_model(base.to(device), bits=4, compute_dtype=dtype)
    else:
        base = base.to(device)
    base.requires_grad_(False)
    r, alpha = lora_rank_alpha(args)
    targets = args.lora_target_modules or "all-linear"
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        policy = get_peft_model(base, config)
    except ValueError as exc:
        raise UsageError(f"--lora-target-modules {targets}: {first_line(exc)}") from None
    for p in policy.parameters():  # the adapter trains in fp32 whatever the base's dtype
        if p.requires_grad and p.dtype != torch.float32 and dtype == torch.float32:
            p.data = p.data.float()
    return policy.train(), None, "adapter"


def build_engine(
    args: argparse.Namespace, policy: torch.nn.Module, ref_model: torch.nn.Module | None, reference: str
) -> DPOEngine:
    """The :class:`fastdpo.DPOEngine` of ``--loss-type`` / ``--loss-weights`` / ``--beta`` / ``--label-smoothing`` /
    ``--grad-in-forward``; a loss the engine refuses is a usage error naming ``--loss-type``."""
    from fastdpo.engine import DPOEngine

    engine_kwargs: dict[str, Any] = {
        "loss_type": args.loss_type if len(args.loss_type) > 1 else args.loss_type[0],
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "grad_in_forward": args.grad_in_forward,
    }
    if args.loss_weights is not None:
        engine_kwargs["loss_weights"] = args.loss_weights
    try:
        return DPOEngine(policy, ref_model, reference=reference, **engine_kwargs)
    except (ValueError, TypeError) as exc:  # e.g. an unknown --loss-type, exo_pair without --label-smoothing
        raise UsageError(f"--loss-type {' '.join(args.loss_type)}: {exc}") from None


def build_collator(args: argparse.Namespace, tokenizer) -> PreferenceCollator:
    """The :class:`fastdpo.collator.PreferenceCollator` of the truncation and ``--packing`` flags."""
    from fastdpo.collator import PreferenceCollator

    return PreferenceCollator(
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation_mode=args.truncation_mode,
        packing=args.packing,
    )


def lr_lambda(schedule: str, warmup: int, total: int):
    """``LambdaLR`` factor of optimizer step ``step``: linear warmup over ``warmup`` steps to 1, then ``constant``,
    ``linear`` decay to 0 at ``total``, or ``cosine`` (``0.5 (1 + cos(pi progress))``)."""

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


@dataclass
class Optimization:
    """What updates the policy: the trainable parameters, AdamW, its schedule, the fp16 loss scaler (``None`` unless
    ``--dtype float16``) and the peak learning rate."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    lr: float


def build_optimizer(
    args: argparse.Namespace, policy: torch.nn.Module, lora: bool, device: torch.device
) -> Optimization:
    """AdamW over the policy's trainable parameters with the ``--lr-schedule``. The peak lr is ``--lr``, else 3e-3 for
    the tiny in-process model, 1e-6 with ``--model``, 1e-4 for a LoRA adapter on ``--model``."""
    lr = (
        args.lr
        if args.lr is not None
        else (1e-6 if args.model is not None and not lora else 3e-3 if args.model is None else 1e-4)
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, args.warmup_steps, args.steps))
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "float16" else None
    return Optimization(params, optimizer, scheduler, scaler, lr)


def trainable_state(policy: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the policy: every weight, or only the adapter's (the base is rebuilt from its
    folder)."""
    if not lora:
        return policy.state_dict()
    return {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}


def load_trainable_state(policy: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    """Put what :func:`trainable_state` kept back into ``policy``; ``ValueError`` when the adapter's weights differ
    in names from this run's."""
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
