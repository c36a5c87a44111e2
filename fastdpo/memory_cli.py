"""``fastdpo memory``: the per-variant table of :mod:`fastdpo.memory`'s estimate, a plot, and ``--measure``.

Default: a representative DPO setup -- Llama-3-8B-shaped, 4 pairs × (512 prompt + 512 completion) tokens, bf16 weights,
AdamW, a frozen reference model, on a GPU -- with every variant side by side, and ``--plot PNG`` for a stacked bar chart
of each variant's peak (what is alive at its peak phase). ``--world-size N --shard zero3|fsdp2`` gives the per-rank
estimate under sharding, ``--sequence-parallel k`` the peak rank of a sequence-parallel group.

``--measure`` builds the model from the config (random weights, optionally fewer layers with ``--layers``) and runs
each variant's step in its own process on CPU, reporting peak RSS over the process's pre-model baseline; the fastdpo
variant with ``prefix_shared`` runs the real :class:`fastdpo.DPOEngine` step on a :class:`fastdpo.PreferenceCollator`
batch. The measuring workers are :mod:`fastdpo.benchmarks.memory_measure` (imported only for ``--measure``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fastdpo.memory import (
    DTYPE_BYTES,
    MIB,
    PACKINGS,
    SHARDS,
    VARIANT_OPTIONS,
    VARIANTS,
    StepConfig,
    estimate,
    estimate_sharded,
)
from fastdpo.model_shape import PRESETS, ModelShape, load_model, param_counts


def _gb(x: float) -> str:
    return f"{x / 2**30:,.2f}" if x >= 2**30 / 100 else f"{x / MIB:,.1f} MiB"


def _png_path(text: str) -> Path:
    """argparse ``type=`` of ``--plot``: a ``.png`` path in an existing, writable folder."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must end in .png, got {text!r}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist or is not writable")
    return path


_PLOT_PARTS = (
    ("weights", "weights"),
    ("optimizer", "optimizer state"),
    ("reference", "reference model"),
    ("grads", "gradients"),
    ("activations", "activations"),
    ("attention_mask", "attention mask"),
    ("logits", "logits / log-prob head"),
)


def plot_estimates(path: Path, title: str, estimates: dict[str, dict[str, Any]]) -> None:
    """A PNG of one stacked bar per variant: what is alive at its peak phase (``peak_parts``), in GiB, with the
    total and the phase above each bar. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdpo.atomic import atomic_write

    names = list(estimates)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 5.5))
    bottoms = [0.0] * len(names)
    colors = plt.get_cmap("tab10").colors
    for (key, label), color in zip(_PLOT_PARTS, colors):
        values = [estimates[n]["peak_parts"].get(key, 0) / 2**30 for n in names]
        if any(values):
            ax.bar(names, values, bottom=bottoms, label=label, color=color)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, n in enumerate(names):
        ax.text(
            i,
            bottoms[i],
            f"{estimates[n]['peak'] / 2**30:.1f}\n{estimates[n]['peak_phase']}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("GiB at the peak")
    ax.set_ylim(0, max(bottoms) * 1.18)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from fastdpo.cli import ArgParser, int_in, one_of

    p = ArgParser(
        prog="fastdpo memory",
        description="Memory of one DPO step, broken down, for naive PyTorch, TRL 1.16 "
        "and fastdpo with each of its options (GiB unless marked). Default: Llama-3-8B, 4 pairs of 512 + "
        "512 tokens, bf16, AdamW, a reference model, on a GPU.",
    )
    p.add_argument(
        "--model",
        default="Llama-3-8B",
        help=f"preset ({', '.join(PRESETS)}) or path to a config.json (default Llama-3-8B)",
    )
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (default 4)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--completion-len", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default bf16 (fp32 with --measure)")
    p.add_argument("--optimizer", **one_of("adamw", "sgd"))
    p.add_argument("--reference", **one_of("model", "precomputed"))
    p.add_argument("--device", choices=("cpu", "cuda"), help="step device (default cuda; cpu with --measure)")
    p.add_argument(
        "--packing",
        **one_of(*PACKINGS),
        help="fastdpo's row layout: padding_free (2 rows per pair, no mask; default) or prefix_shared "
        "(one [prompt, chosen, rejected] row per pair, 4-D attention mask); naive and TRL always use 2 rows "
        "per pair",
    )
    p.add_argument(
        "--pairs-per-row",
        type=int,
        default=1,
        help="prefix_shared: pairs packed per row (default 1; the collator's default max_tokens_per_row="
        "None packs all of them: --pairs-per-row PAIRS)",
    )
    p.add_argument(
        "--sequence-parallel",
        type=int_in(1),
        default=1,
        metavar="K",
        help="fastdpo's sequence-parallel group size: its column is per rank (--measure runs K CPU "
        "processes and reports the peak rank); naive and TRL stay single-process",
    )
    p.add_argument("--layers", type=int_in(1), help="override num_hidden_layers (scaled model)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--plot",
        type=_png_path,
        metavar="PNG",
        help="also write a stacked bar chart of each variant's peak (by part) to this .png file",
    )
    p.add_argument("--measure", action="store_true", help="also run each variant's step on CPU and compare")
    p.add_argument(
        "--world-size",
        type=int_in(1, 1 << 20),
        default=1,
        help="ranks the model is sharded over (with --shard); --pairs are then each rank's pairs",
    )
    p.add_argument(
        "--shard",
        choices=SHARDS,
        help="per-rank memory with DeepSpeed ZeRO-3 or FSDP2 sharding over --world-size ranks; with "
        "--measure the fastdpo engine step runs on --world-size CPU processes (torchrun, gloo)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastdpo memory``; returns the exit code. A usage error prints one line on stderr and raises
    :class:`fastdpo.cli.UsageError` (a ``SystemExit`` with code 2 whose text is the message), as argparse does."""
    from fastdpo.cli import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
        if not variants:
            raise UsageError(f"--variants: name at least one of {','.join(VARIANTS)}")
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise UsageError(f"--variants: unknown variant(s) {bad}; choices: {list(VARIANTS)}")
        try:
            shape, cfg = load_model(args.model)
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from None
        if args.layers is not None:
            shape = replace(shape, num_hidden_layers=args.layers)
        try:
            step = StepConfig(
                pairs=args.pairs,
                prompt_len=args.prompt_len,
                completion_len=args.completion_len,
                dtype=args.dtype or ("fp32" if args.measure else "bf16"),
                optimizer=args.optimizer,
                reference=args.reference,
                device=args.device or ("cpu" if args.measure else "cuda"),
                packing=args.packing,
                pairs_per_row=args.pairs_per_row,
                sequence_parallel=args.sequence_parallel,
            )
        except ValueError as exc:
            flag = {
                "pairs": "--pairs",
                "prompt_len": "--prompt-len",
                "completion_len": "--completion-len",
                "pairs_per_row": "--pairs-per-row",
            }.get(str(exc).split()[0], "")
            raise UsageError(f"{flag + ': ' if flag else ''}{exc}") from None
        if shape.num_attention_heads % step.sequence_parallel:
            raise UsageError(
                f"--sequence-parallel: {step.sequence_parallel} does not divide the model's "
                f"{shape.num_attention_heads} attention heads"
            )
        gif = [v for v in variants if VARIANT_OPTIONS.get(v, {}).get("grad_in_forward")]
        if step.sequence_parallel > 1 and gif:  # DPOEngine refuses grad_in_forward with sequence parallelism
            if args.variants != build_parser().get_default("variants"):
                raise UsageError(f"--variants: {gif} use grad_in_forward, which sequence parallelism does not support")
            variants = [v for v in variants if v not in gif]
        if args.measure and step.device != "cpu":
            raise UsageError("--measure runs on CPU; use --device cpu")
        _check_shard_args(args)
    except UsageError as exc:
        print(f"fastdpo memory: {exc}", file=sys.stderr)
        raise
    if args.shard is not None:
        estimates = {v: estimate_sharded(shape, step, v, args.world_size, args.shard) for v in variants}
        measured = {}
        if args.measure:  # the sharded measurement runs the fastdpo engine step only
            measured = {
                v: {"variant": v, "error": "not measured (sharded: fastdpo's engine step only)"} for v in variants
            }
            if "fastdpo" in variants:
                from fastdpo.benchmarks.memory_measure import measure_sharded

                measured.update(measure_sharded(cfg, step, args.world_size, args.shard, args.layers))
    else:
        estimates = {v: estimate(shape, step, v) for v in variants}
        measured = {}
        if args.measure:
            from fastdpo.benchmarks.memory_measure import measure

            measured = measure(cfg, step, variants, args.layers)
    for v, res in measured.items():
        if "peak" in res:
            res["estimate_error_pct"] = 100.0 * (estimates[v]["peak"] - res["peak"]) / res["peak"]
    report_ = {"model": asdict(shape), "step": asdict(step), "estimates": estimates, "measured": measured}
    if args.plot is not None:
        plot_estimates(args.plot, _headline(shape, step), estimates)
    if args.json:
        print(json.dumps(report_, indent=1))
        return 0
    _print_report(shape, step, estimates, measured)
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0


def _headline(shape: ModelShape, step: StepConfig) -> str:
    p = param_counts(shape)["total"]
    return (
        f"{shape.name} ({shape.model_type}, {p / 1e9:.3f} B params, {shape.num_hidden_layers} layers, "
        f"V={shape.vocab_size}, D={shape.hidden_size}); {step.pairs} pairs × ({step.prompt_len} prompt + "
        f"{step.completion_len} completion) tokens, {step.dtype}, {step.optimizer}, reference {step.reference}, "
        f"{step.device}; fastdpo packing {step.packing}"
        + (
            f" ({step.pairs_per_row} pair{'s' if step.pairs_per_row != 1 else ''} per row)"
            if step.packing == "prefix_shared"
            else ""
        )
        + (
            f"; fastdpo sequence-parallel over {step.sequence_parallel} ranks: its columns are the peak rank"
            if step.sequence_parallel > 1
            else ""
        )
    )


def _check_shard_args(args: argparse.Namespace) -> None:
    """``--world-size`` / ``--shard`` consistency (``UsageError``)."""
    from fastdpo.cli import UsageError

    if args.world_size > 1 and args.shard is None:
        raise UsageError(
            "--world-size needs --shard zero3|fsdp2 (data parallelism without sharding keeps a full "
            "replica on each rank: the estimate without --world-size)"
        )
    if args.shard is not None and args.sequence_parallel > 1:
        raise UsageError(
            "--sequence-parallel with --shard: the per-rank estimate models either fastdpo's sequence "
            "parallelism (on DDP) or ZeRO-3/FSDP2 sharding, not both together"
        )
    if args.shard is not None and args.measure:
        cpus = os.cpu_count() or 1
        if args.world_size > max(2, cpus):
            raise UsageError(
                f"--measure with --shard runs one process per rank: --world-size {args.world_size} is "
                f"more than this machine's {cpus} CPUs"
            )


def _print_report(
    shape: ModelShape, step: StepConfig, estimates: dict[str, dict[str, Any]], measured: dict[str, dict[str, Any]]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(_headline(shape, step))
    first = next(iter(estimates.values()))
    sharded = f", per rank: {first['shard']} over {first['world_size']} ranks" if "shard" in first else ""
    table = Table(title=f"DPO step memory (GiB{sharded})")
    table.add_column("part")
    for v in estimates:
        table.add_column(v.replace("+", "\n+ "), justify="right")
    for key in ("weights", "grads", "optimizer", "reference", "activations", "attention_mask", "logits", "peak"):
        label = {"logits": "logits / log-probs", "attention_mask": "attention mask"}.get(key, key)
        table.add_row(label, *(_gb(e[key]) for e in estimates.values()))
    table.add_row("peak phase", *(e["peak_phase"] for e in estimates.values()))
    base = estimates.get("trl", estimates.get("naive"))
    if base is not None:
        ref_name = "trl" if "trl" in estimates else "naive"
        table.add_row(
            f"peak vs {ref_name}", *(f"{(e['peak'] - base['peak']) / 2**30:+,.2f}" for e in estimates.values())
        )
    table.add_row("head positions", *(f"{e['head_positions']:,}" for e in estimates.values()))
    if measured:
        table.add_row(
            "measured peak",
            *(_gb(measured[v]["peak"]) if "peak" in measured[v] else measured[v].get("error", "-") for v in estimates),
        )
        table.add_row(
            "estimate error",
            *(f"{measured[v]['estimate_error_pct']:+.1f}%" if "peak" in measured[v] else "-" for v in estimates),
        )
        if any("rank_peaks" in measured[v] for v in estimates):
            table.add_row(
                "measured per rank",
                *(
                    " / ".join(_gb(x) for x in measured[v]["rank_peaks"]) if "rank_peaks" in measured[v] else "-"
                    for v in estimates
                ),
            )
    console.print(table)
    console.print(
        "weights/grads/optimizer/reference are resident; activations = saved for backward by the policy "
        "backbone; attention mask = prefix_shared's packed-row masks during the forwards; logits = the "
        "head's transient peak on top; peak = largest phase total. fastdpo+X: fastdpo with option X "
        "(prefix_shared: the prompt once per pair; grad_in_forward: head gradients in the forward, 3 GEMMs "
        "instead of 4; precomputed_ref: cached reference log-probs, no reference weights; all: the three)."
    )


if __name__ == "__main__":
    sys.exit(main())
