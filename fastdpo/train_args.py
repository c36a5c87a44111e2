"""The command line of ``fastdpo train``: its arguments (each value checked by argparse ``type=`` functions that name
the flag) and the combinations argparse cannot check, all one-line usage errors with exit code 2 (see
:mod:`fastdpo.cli`). The run itself is :mod:`fastdpo.train`. An option without a ``default=`` is ``None`` when not given
(argparse's default): the run then picks its value (``--lr`` by the kind of model, ``--lora-alpha`` as ``2 r``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdpo.cli import ArgParser, UsageError, float_in, int_in, one_of, output_dir, threads
from fastdpo.tiny import ARCHS, TRAIN_SPECIAL_TOKENS

__all__ = ["MIN_VOCAB", "build_parser"]


MIN_VOCAB = 256 + len(TRAIN_SPECIAL_TOKENS)  # the byte-level alphabet is always in the vocabulary
_SEED_MAX = 2**63 - 1


def build_parser() -> ArgParser:
    p = ArgParser(
        prog="fastdpo train",
        description="Train a causal LM with DPO on a local preference file (JSON/JSONL/Parquet) or the bundled "
        "demo set, with fastdpo's engine (fused LM head, packing, reference modes).",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="local model folder (save_pretrained format; nothing is downloaded). Default: a "
        "tiny model built from a config, with a tokenizer trained in-process on the data",
    )
    g.add_argument("--arch", **one_of(*ARCHS), help="tiny model architecture (no --model)")
    g.add_argument("--hidden-size", type=int_in(16), default=64, help="tiny model width, a multiple of 16 (no --model)")
    g.add_argument("--layers", type=int_in(1), default=2, help="tiny model depth (no --model)")
    g.add_argument(
        "--vocab-size",
        type=int_in(MIN_VOCAB),
        default=512,
        help=f"largest in-process tokenizer vocabulary (fewer when the data has fewer merges), at least "
        f"{MIN_VOCAB}: the 256 bytes and the special tokens (no --model)",
    )
    g.add_argument(
        "--lora-r",
        type=int_in(1),
        help="train a LoRA adapter of this rank (peft) instead of every weight; the reference is the base "
        "model with the adapter disabled (no second copy); model/ holds the adapter",
    )
    g.add_argument("--lora-alpha", type=float_in(0.0, low_open=True), help="LoRA alpha (default 2 r)")
    g.add_argument("--lora-dropout", type=float_in(0.0, 1.0, high_open=True), default=0.0)
    g.add_argument(
        "--lora-target-modules",
        nargs="+",
        help="module names the adapter wraps (default: every linear layer but the LM head)",
    )
    g.add_argument(
        "--qlora",
        action="store_true",
        help="QLoRA: the frozen base in 4-bit NF4 (bitsandbytes), a LoRA adapter on top (rank --lora-r, default 16)",
    )
    g.add_argument(
        "--dtype",
        **one_of("float32", "bfloat16", "float16"),
        help="float32; bfloat16 (weights and optimizer in bf16); float16 (mixed precision: fp32 weights and "
        "optimizer, fp16 autocast, dynamic loss scaling)",
    )
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=threads, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training preference file (.json/.jsonl/.parquet). Default: bundled demo set")
    g.add_argument(
        "--eval-data",
        help="held-out preference file. Default: the demo's held-out split with the demo "
        "set, else --eval-fraction of --data",
    )
    g.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.1,
        help="held-out share of --data without --eval-data",
    )
    g.add_argument("--max-length", type=int_in(1), help="truncate prompt+completion to this many tokens")
    g.add_argument("--max-prompt-length", type=int_in(0), help="truncate the prompt first")
    g.add_argument("--max-completion-length", type=int_in(0), help="keep the first N tokens of each completion")
    g.add_argument(
        "--truncation-mode",
        **one_of("keep_end", "keep_start"),
        help="which end --max-length and --max-prompt-length keep (TRL's truncation_mode)",
    )
    g.add_argument(
        "--packing",
        **one_of("pad", "padding_free", "prefix_shared"),
        help="pad (TRL's batch), padding_free (sequences back to back) or prefix_shared (each prompt once per pair)",
    )
    g = p.add_argument_group("DPO")
    g.add_argument("--loss-type", nargs="+", default=["sigmoid"], help="one or more TRL loss types")
    g.add_argument("--loss-weights", type=float_in(), nargs="+")
    g.add_argument("--beta", type=float_in(0.0, low_open=True), default=0.1)
    g.add_argument("--label-smoothing", type=float_in(0.0, 1.0, high_open=True), default=0.0)
    g.add_argument(
        "--grad-in-forward",
        action="store_true",
        help="form the LM-head gradients in the forward pass (3 GEMMs instead of 4; no token metrics)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int_in(1), default=300, help="optimizer steps")
    g.add_argument(
        "--batch-size",
        type=int_in(1),
        default=16,
        help="preference pairs per micro-batch and process (an optimizer step sees batch-size x "
        "grad-accum x processes pairs)",
    )
    g.add_argument("--grad-accum", type=int_in(1), default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument(
        "--lr",
        type=float_in(0.0, low_open=True),
        help="peak learning rate (default: 3e-3 for the tiny in-process model, 1e-6 with --model, 1e-4 for "
        "a LoRA adapter on --model)",
    )
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.0)
    g.add_argument("--warmup-steps", type=int_in(0), default=10)
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--max-grad-norm", type=float_in(0.0), default=1.0, help="0 disables clipping")
    g.add_argument(
        "--on-nonfinite",
        **one_of("stop", "skip"),
        help="a non-finite loss or gradient: stop the run (exit code 1, nothing non-finite is written; "
        'default) or skip that step (no optimizer step; logged with "skipped": true)',
    )
    g.add_argument("--seed", type=int_in(0, _SEED_MAX), default=0)
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--output-dir", type=output_dir, default=Path("fastdpo-output"))
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir that holds an earlier run (its files are deleted)",
    )
    g.add_argument("--eval-every", type=int_in(0), default=50, help="evaluate every N steps (0: only before and after)")
    g.add_argument("--eval-batch-size", type=int_in(1), default=32)
    g.add_argument(
        "--eval-batches", type=int_in(1), help="cap on held-out batches per evaluation (per process under torchrun)"
    )
    g.add_argument("--save-every", type=int_in(0), default=50, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int_in(0), default=10, help="print a metrics line every N steps (0: never)")
    g.add_argument(
        "--report-to",
        **one_of("none", "tensorboard"),
        help="tensorboard: also write the metrics as TensorBoard scalars under --output-dir/runs",
    )
    g.add_argument("--resume", action="store_true", help="continue from --output-dir/checkpoint.pt")
    g.add_argument(
        "--stop-after",
        type=int_in(1),
        help="checkpoint and exit after N steps of this invocation (time-sliced jobs; resume later)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def uses_lora(args: argparse.Namespace) -> bool:
    """Whether the run trains a LoRA adapter: ``--lora-r`` or ``--qlora`` given."""
    return args.lora_r is not None or args.qlora


def lora_rank_alpha(args: argparse.Namespace) -> tuple[int, int]:
    """The adapter's ``(r, lora_alpha)``: ``--lora-r`` (default 16) and ``--lora-alpha`` (default ``2 r``)."""
    r = args.lora_r or 16
    return r, args.lora_alpha or 2 * r


def _check_args(args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot check (one-line usage errors naming the flags)."""
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output-dir and --overwrite starts over: give one")
    if args.model is None and args.hidden_size % 16:
        raise UsageError(f"--hidden-size must be a multiple of 16 (4 heads of even size), got {args.hidden_size}")
    if args.loss_weights is not None and len(args.loss_weights) != len(args.loss_type):
        raise UsageError(
            f"--loss-weights: {len(args.loss_weights)} weight(s) for {len(args.loss_type)} --loss-type "
            f"value(s) ({' '.join(args.loss_type)}); give one weight per loss type"
        )
    lora = uses_lora(args)
    if not lora:
        for flag, value in (
            ("--lora-alpha", args.lora_alpha),
            ("--lora-target-modules", args.lora_target_modules),
            ("--lora-dropout", args.lora_dropout or None),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --lora-r (or --qlora)")
    if args.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--qlora needs bitsandbytes (pip install 'fastdpo[bnb]')") from None
        if args.dtype == "float16":
            raise UsageError("--qlora computes in --dtype float32 or bfloat16, not float16")
    if lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--lora-r / --qlora need peft (pip install 'fastdpo[train]')") from None
    if args.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UsageError(
                "--report-to tensorboard needs the tensorboard package (pip install 'fastdpo[train]')"
            ) from None
