"""Long-sequence DPO step with sequence parallelism: per-rank peak memory and step time, ``sp = 1`` vs ``sp = k``.

For each group size ``k`` in ``--sp``, ``k`` worker processes (gloo on CPU, ``--threads`` intra-op threads shared out:
``threads // k`` per rank, so every setting uses the same cores) build the same tiny Llama (policy + reference),
collate one long batch and run :class:`fastdpo.DPOEngine` steps with ``sequence_parallel_size=k`` (``k = 1``: the plain
engine): reference forward, policy forward, loss, backward, gradient average over the group. As
``fastdpo.benchmarks.engine_step`` does, time and memory come from separate launches:

* timing (plain glibc malloc): ``--warmup`` steps, then the median of ``--steps`` step times (rank 0's; the ranks
  synchronize in every step);
* memory: :func:`fastdpo.benchmarks.memory_measure.measure_sequence_parallel` (``k`` processes with
  ``MALLOC_ENV``, freed tensors leave the resident set at once): each rank's peak resident set over its pre-model
  baseline during one step after a warm-up step -- weights, gradients, reference and the step's peak -- next to the
  estimator's per-rank peak (:func:`fastdpo.memory.estimate`, :mod:`fastdpo.sp_memory` for ``k > 1``).

Usage::

    python -m fastdpo.benchmarks.sequence_parallel                      # defaults below, prints a table
    python -m fastdpo.benchmarks.sequence_parallel --seq-len 8192 --packing prefix_shared --json out.json

CPU only (the GPU path of the engine is the same code; this driver does not launch NCCL ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from fastdpo.benchmarks.measure import start_ranks

MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastdpo.benchmarks.sequence_parallel", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sp", default="1,2", help="comma-separated sequence-parallel group sizes (default 1,2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads in total, shared by a group's ranks")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096, help="prompt + completion tokens per sequence")
    p.add_argument("--completion-len", type=int, default=512)
    p.add_argument(
        "--packing",
        choices=("pad", "prefix_shared"),
        default="pad",
        help="pad: 2 equal rows per pair, causal attention without a mask; prefix_shared: one "
        "[prompt, chosen, rejected] row per pair with its full-length mask",
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def _config(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": args["vocab"],
        "hidden_size": args["hidden"],
        "intermediate_size": 4 * args["hidden"],
        "num_hidden_layers": args["layers"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": args["hidden"] // 4,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4 * args["seq_len"],
        "rms_norm_eps": 1e-6,
    }


def worker(args: dict[str, Any], rank: int, world: int, init_file: str) -> dict[str, Any]:
    """One rank of the timing launch (see the module docstring)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from fastdpo.benchmarks.memory_measure import hf_config
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine
    from fastdpo.tiny import id_tokenizer

    torch.set_num_threads(max(1, args["threads"] // world))
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
    config = hf_config(_config(args), None, "fp32")
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().requires_grad_(False)
    engine = DPOEngine(policy, ref, sequence_parallel_size=world)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-6)
    c = args["completion_len"]
    p = args["seq_len"] - c
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, args["vocab"], (n,), generator=gen).tolist()

    rows = [
        {"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(c)}
        for _ in range(args["pairs"])
    ]
    batch = PreferenceCollator(id_tokenizer(args["vocab"]), packing=args["packing"])(rows)

    def step() -> float:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss, _ = engine.step(batch)
        loss.backward()
        engine.reduce_sequence_parallel_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        return time.perf_counter() - t0

    try:
        out: dict[str, Any] = {
            "rank": rank,
            "shape": list(batch["input_ids"].shape),
            "loss_check": float(engine.step(batch)[0].detach()),
        }
        opt.zero_grad(set_to_none=True)
        for _ in range(args["warmup"]):
            step()
        out["step_s"] = statistics.median(step() for _ in range(args["steps"]))
    finally:
        if world > 1:
            dist.destroy_process_group()
    return out


def launch(args: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """``k`` ranks of :func:`worker`; their results in rank order (raises with the ranks' output on failure)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args["threads"] // k)))
    with tempfile.TemporaryDirectory(prefix="fastdpo-spbench-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as fh:
            json.dump(args, fh)
        procs = start_ranks(
            "fastdpo.benchmarks.sequence_parallel",
            lambda r: ["--worker", spec, str(r), str(k), os.path.join(tmp, "init"), os.path.join(tmp, f"{r}.json")],
            k,
            env,
        )
        outputs = [proc.communicate()[0] for proc in procs]
        results = []
        for r, proc in enumerate(procs):
            path = os.path.join(tmp, f"{r}.json")
            if proc.returncode != 0 or not os.path.exists(path):
                raise RuntimeError(f"sp={k} timing rank {r} failed (exit {proc.returncode}):\n{outputs[r][-4000:]}")
            with open(path) as fh:
                results.append(json.load(fh))
    return results


def _step(args: dict[str, Any], k: int) -> Any:
    from fastdpo import memory as M

    return M.StepConfig(
        pairs=args["pairs"],
        prompt_len=args["seq_len"] - args["completion_len"],
        completion_len=args["completion_len"],
        dtype="fp32",
        optimizer="sgd",
        reference="model",
        device="cpu",
        packing="prefix_shared" if args["packing"] == "prefix_shared" else "padding_free",
        sequence_parallel=k,
    )


def run(args: dict[str, Any]) -> list[dict[str, Any]]:
    from fastdpo import memory as M
    from fastdpo.benchmarks.memory_measure import measure_sequence_parallel

    rows = []
    for k in args["sp"]:
        timed = launch(args, k)
        step = _step(args, k)
        mem = measure_sequence_parallel(_config(args), step, None)
        if "error" in mem:
            raise RuntimeError(f"sp={k} memory: {mem['error']}")
        est = M.estimate(M.shape_from_config(_config(args)), step, "fastdpo")
        rows.append(
            {
                "sp": k,
                "threads_per_rank": max(1, args["threads"] // k),
                "shape": timed[0]["shape"],
                "loss": timed[0]["loss_check"],
                "step_s": timed[0]["step_s"],
                "peak_mb": [x / MIB for x in mem["rank_peaks"]],
                "estimate_mb": est["peak"] / MIB,
                "activations_mb": est["activations"] / MIB,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        spec, rank, world, init_file, out = argv[1:]
        with open(spec) as fh:
            result = worker(json.load(fh), int(rank), int(world), init_file)
        with open(out, "w") as fh:
            json.dump(result, fh)
        return 0
    ns = build_parser().parse_args(argv)
    try:
        sizes = [int(x) for x in ns.sp.split(",") if x]
    except ValueError:
        raise SystemExit(f"sequence_parallel benchmark: --sp must be comma-separated integers, got {ns.sp!r}") from None
    if not sizes or min(sizes) < 1 or ns.seq_len <= ns.completion_len or ns.completion_len < 2:
        raise SystemExit("sequence_parallel benchmark: need --sp sizes >= 1 and --seq-len > --completion-len >= 2")
    args = dict(vars(ns), sp=sizes)
    rows = run(args)
    print(
        f"tiny Llama (hidden {ns.hidden}, {ns.layers} layers, V {ns.vocab}, fp32), {ns.pairs} pair(s) of "
        f"{ns.seq_len - ns.completion_len} + {ns.completion_len} tokens, packing {ns.packing}, "
        f"{ns.threads} threads in total"
    )
    print(
        f"{'sp':>3} {'rows x cols':>12} {'thr/rank':>8} {'step s':>8} {'peak MB per rank':>20} "
        f"{'estimate MB':>11} {'loss':>10}"
    )
    for r in rows:
        peaks = " / ".join(f"{x:.0f}" for x in r["peak_mb"])
        print(
            f"{r['sp']:>3} {'x'.join(map(str, r['shape'])):>12} {r['threads_per_rank']:>8} {r['step_s']:>8.2f} "
            f"{peaks:>20} {r['estimate_mb']:>11.0f} {r['loss']:>10.6f}"
        )
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"args": args, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
