"""One DPO training step, end to end: ``fastdpo.DPOEngine`` (prefix-shared packing, fused head) vs TRL 1.16
``DPOTrainer`` on the same tiny Llama, the same weights and the same prompt-heavy batch.

Each implementation runs in worker processes of its own (``python -m fastdpo.benchmarks.engine_step --worker NAME``);
a worker builds policy + reference, collates the batch, runs ``--warmup`` steps of forward (reference + policy) + loss +
backward, then:

* timing worker (plain glibc malloc): times ``--steps`` steps; median step time and pairs/s;
* memory worker (fixed glibc mmap threshold, ``fastdpo.benchmarks.measure.MALLOC_ENV``, so freed tensors leave the
  resident set at once and a warm heap cannot hide a peak): one more step after resetting the high-water mark through
  ``/proc/self/clear_refs``; the extra peak resident set over the set-up, and the whole process's peak (``VmHWM``).

The two are separate because the mmap threshold that makes peaks visible also turns every large allocation into page
faults, which would distort the timing. ``--rounds`` alternates the timing workers and keeps each one's fastest round
(the machine may be shared).

The TRL step is ``trainer.compute_loss(model, batch)`` + ``backward()`` on a batch from the trainer's own
``DataCollatorForPreference`` (token ids identical to fastdpo's batch); both report the loss, which must agree. Both
run in fp32 (``DPOConfig(bf16=False)``: TRL's default ``bf16=True`` would run its reference forward under bf16
autocast).

Usage::

    python -m fastdpo.benchmarks.engine_step                 # the defaults (--help), prints a table
    python -m fastdpo.benchmarks.engine_step --pairs 8 --prompt-len 384 --completion-len 128 --json out.json

Measured results on a particular machine: ``benchmarks/results/cpu-20261125-engine-step.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from fastdpo.benchmarks.measure import proc_status_kb, reset_peak_rss

IMPLS = ("engine", "engine_pad", "trl")
_DESCRIPTIONS = {
    "engine": "fastdpo DPOEngine, prefix_shared packing",
    "engine_pad": "fastdpo DPOEngine, pad packing",
    "trl": "TRL 1.16 DPOTrainer.compute_loss",
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdpo.benchmarks.engine_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="engine,trl", help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per batch")
    p.add_argument("--prompt-len", type=int, default=192, help="mean prompt tokens")
    p.add_argument("--completion-len", type=int, default=64, help="mean completion tokens (chosen and rejected)")
    p.add_argument("--jitter", type=float, default=0.5, help="lengths drawn uniformly in mean*(1 +- jitter)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--max-tokens-per-row",
        type=int,
        default=-1,
        help="engine: start a new packed row past this many tokens (-1: about one pair per row, "
        "0: everything in one row); attention cost grows with the square of the row length",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="alternate the workers this many times, keep the best")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="time", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------------- shared set-up
def make_rows(args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Pre-tokenized pairs, prompt ~3x completion, lengths varied; token ids avoid the special ids 0..2."""
    gen = torch.Generator().manual_seed(args.seed)

    def length(mean: int) -> int:
        lo, hi = max(1, round(mean * (1 - args.jitter))), max(1, round(mean * (1 + args.jitter)))
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def ids(n: int) -> list[int]:
        return torch.randint(3, args.vocab, (n,), generator=gen).tolist()

    return [
        {
            "prompt_input_ids": [BOS_ID] + ids(length(args.prompt_len) - 1),
            "chosen_input_ids": ids(length(args.completion_len) - 1) + [EOS_ID],
            "rejected_input_ids": ids(length(args.completion_len) - 1) + [EOS_ID],
        }
        for _ in range(args.pairs)
    ]


def make_tokenizer(vocab: int):
    """A word-level tokenizer over ids ``0..vocab-1`` (``<pad>``, ``<s>``, ``</s>``, then ``t3``...): TRL needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    words.update({f"t{i}": i for i in range(3, vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def llama_config(**fields: Any) -> Any:
    """A ``LlamaConfig`` of ``fields`` with this benchmark's special token ids (``PAD_ID``, ``BOS_ID``, ``EOS_ID``)."""
    from transformers import LlamaConfig

    return LlamaConfig(**fields, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def perturbed_pair(
    config: Any,
    *,
    seed: int,
    noise: float,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(policy, reference)`` Llama models of ``config`` in ``dtype`` on ``device``: the reference drawn with
    ``torch.manual_seed(seed)``, the policy its copy plus ``noise * N(0, 1)`` per weight (generator seeded
    ``seed + 1`` on ``device``). The reference is frozen in eval mode, the policy in train mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        ref = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
        policy = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    policy.load_state_dict(ref.state_dict())
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_((torch.randn(p.shape, generator=gen, device=device) * noise).to(p.dtype))
    ref.eval().requires_grad_(False)
    policy.train()
    return policy, ref


def make_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Tiny fp32 Llama policy and reference (the policy is the reference plus a small perturbation)."""
    config = llama_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=4 * (args.prompt_len + 2 * args.completion_len),
        tie_word_embeddings=False,
    )
    return perturbed_pair(config, seed=args.seed, noise=0.01)


# ---------------------------------------------------------------------------------------------------- workers
def _engine_step_fn(args: argparse.Namespace, packing: str):
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine

    policy, ref = make_models(args)
    tok = make_tokenizer(args.vocab)
    cap = args.max_tokens_per_row
    if cap < 0:
        cap = args.prompt_len + 2 * args.completion_len
    kwargs = {"max_tokens_per_row": cap} if cap > 0 and packing != "pad" else {}
    batch = PreferenceCollator(tok, packing=packing, **kwargs)(make_rows(args))
    engine = DPOEngine(policy, ref, reference="model", loss_type="sigmoid", beta=0.1)

    def step() -> float:
        policy.zero_grad(set_to_none=True)
        loss, _ = engine.step(batch)
        loss.backward()
        return float(loss.detach())

    return step


def make_trl_trainer(policy: torch.nn.Module, ref: torch.nn.Module, tok: Any, pairs: int, *, use_cpu: bool):
    """TRL 1.16 ``DPOTrainer`` over ``policy``/``ref``: sigmoid loss, beta 0.1, no truncation, no logging or saving,
    mixed precision off (the models run in their own dtype); a one-row dummy dataset, since the benchmark's batches
    come from ``trainer.data_collator(trl_examples(rows))``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    out_dir = tempfile.mkdtemp(prefix="fastdpo-bench-trl-")
    config = DPOConfig(
        output_dir=out_dir,
        report_to="none",
        per_device_train_batch_size=pairs,
        max_length=None,
        beta=0.1,
        loss_type=["sigmoid"],
        use_cpu=use_cpu,
        bf16=False,
        save_strategy="no",
        logging_strategy="no",
        push_to_hub=False,
        dataloader_num_workers=0,
    )
    dummy = Dataset.from_list([{"prompt": "t3 t4", "chosen": " t5", "rejected": " t6"}])
    return DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dummy, processing_class=tok)


def trl_examples(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """:func:`make_rows` rows in the keys TRL's ``DataCollatorForPreference`` reads."""
    return [
        {
            "prompt_ids": r["prompt_input_ids"],
            "chosen_ids": r["chosen_input_ids"],
            "rejected_ids": r["rejected_input_ids"],
        }
        for r in rows
    ]


def _trl_step_fn(args: argparse.Namespace):
    policy, ref = make_models(args)
    trainer = make_trl_trainer(policy, ref, make_tokenizer(args.vocab), args.pairs, use_cpu=True)
    batch = trainer.data_collator(trl_examples(make_rows(args)))
    model = trainer.model
    model.train()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return float(loss.detach())

    return step


def worker(args: argparse.Namespace) -> int:
    """Run one implementation and write its measurements as JSON to ``args.out``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import gc

    name = args.worker
    t_setup = time.perf_counter()
    step = (
        _trl_step_fn(args) if name == "trl" else _engine_step_fn(args, "prefix_shared" if name == "engine" else "pad")
    )
    setup_s = time.perf_counter() - t_setup
    losses = [step() for _ in range(args.warmup)]
    record: dict[str, Any] = {
        "impl": name,
        "description": _DESCRIPTIONS[name],
        "pairs": args.pairs,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
    }
    if args.measure == "memory":
        gc.collect()
        base_kb = proc_status_kb("VmRSS")
        reset_peak_rss()
        losses.append(step())
        peak_kb = proc_status_kb("VmHWM")
        record.update(
            extra_peak_mb=(peak_kb - base_kb) / 1024,
            setup_rss_mb=base_kb / 1024,
            peak_rss_mb=max(peak_kb, base_kb) / 1024,
            loss=losses[-1],
        )
    else:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        record.update(step_s=median, min_step_s=min(times), pairs_per_s=args.pairs / median, loss=losses[-1])
    with open(args.out, "w") as fh:
        json.dump(record, fh)
    return 0


# ---------------------------------------------------------------------------------------------------- driver
def _worker_argv(args: argparse.Namespace, impl: str, out: str, measure: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "fastdpo.benchmarks.engine_step",
        "--worker",
        impl,
        "--out",
        out,
        "--measure",
        measure,
    ]
    for key in (
        "pairs",
        "prompt_len",
        "completion_len",
        "jitter",
        "vocab",
        "hidden",
        "layers",
        "heads",
        "steps",
        "warmup",
        "threads",
        "seed",
        "max_tokens_per_row",
    ):
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return argv


def run_worker(args: argparse.Namespace, impl: str, measure: str) -> dict[str, Any]:
    """Start one worker process (``measure`` "time" or "memory") and return its record (raises ``RuntimeError`` with
    its stderr on failure)."""
    from fastdpo.benchmarks.measure import MALLOC_ENV

    fd, out = tempfile.mkstemp(prefix=f"fastdpo-engine-step-{impl}-", suffix=".json")
    os.close(fd)
    try:
        env = dict(os.environ, **MALLOC_ENV) if measure == "memory" else dict(os.environ)
        proc = subprocess.run(
            _worker_argv(args, impl, out, measure), env=env, capture_output=True, text=True, timeout=args.timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"worker {impl} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as fh:
            return json.load(fh)
    finally:
        os.unlink(out)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table (and write ``--json``). Returns 0, or 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker(args)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad or not impls:
        print(f"engine_step: unknown impls {bad}; choose from {list(IMPLS)}", file=sys.stderr)
        return 2
    for name in ("pairs", "prompt_len", "completion_len", "steps", "rounds", "vocab", "hidden", "layers"):
        if getattr(args, name) < 1:
            print(f"engine_step: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for impl in impls:
            rec = run_worker(args, impl, "time")
            if impl not in best or rec["step_s"] < best[impl]["step_s"]:
                best[impl] = rec
    for impl in impls:
        mem = run_worker(args, impl, "memory")
        best[impl].update({k: mem[k] for k in ("extra_peak_mb", "setup_rss_mb", "peak_rss_mb")})
        best[impl]["memory_run_loss"] = mem["loss"]
    records = [best[i] for i in impls]
    rows = make_rows(args)
    n_prompt = sum(len(r["prompt_input_ids"]) for r in rows)
    n_comp = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    print(
        f"DPO step, tiny Llama (vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers), {args.pairs} pairs: "
        f"{n_prompt} prompt + {n_comp} completion tokens (prompt/completion per sequence "
        f"{n_prompt / n_comp * 2:.2f}), fp32, CPU, {records[0]['threads']} threads, median of {args.steps} steps, "
        f"best of {args.rounds} round(s)"
    )
    print(f"{'impl':<12} {'step s':>8} {'pairs/s':>8} {'extra peak MB':>14} {'peak RSS MB':>12} {'loss':>10}")
    for r in records:
        print(
            f"{r['impl']:<12} {r['step_s']:>8.3f} {r['pairs_per_s']:>8.2f} {r['extra_peak_mb']:>14.1f} "
            f"{r['peak_rss_mb']:>12.1f} {r['loss']:>10.6f}"
        )
    if "trl" in best:
        base = best["trl"]
        for r in records:
            if r["impl"] != "trl":
                print(
                    f"{r['impl']} vs trl: {r['pairs_per_s'] / base['pairs_per_s']:.2f}x pairs/s, extra peak "
                    f"{r['extra_peak_mb'] / max(base['extra_peak_mb'], 1e-9):.2f}x, peak RSS "
                    f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x, |loss diff| {abs(r['loss'] - base['loss']):.2e}"
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "records": records},
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
