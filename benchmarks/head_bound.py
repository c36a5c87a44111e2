"""Lower bound on the fused head's fwd+bwd time under a memory budget, measured on this device (CPU).

``python -m fastdpo.benchmarks.head_bound [--tokens 2048 --hidden 512 --vocab 128256 --budget-mb 250]``

The head's backward needs ``softmax(h @ W.T)`` for every (token, vocabulary) entry to form
``grad_W = (g * (onehot - P)).T @ H`` and ``grad_H = (g * (onehot - P)) @ W``; the upstream gradient ``g`` is only known
in backward. Naive PyTorch keeps the ``[N, V]`` logits: 3 GEMMs of ``2·N·D·V`` FLOPs. Any method whose extra memory is
at most ``budget`` bytes can keep at most a fraction ``k = budget / (4·N·V)`` of the fp32 logits and must recompute the
rest, each entry at ``D`` multiply-adds: at least ``3 + (1 - k)`` GEMMs. This script measures each GEMM as the fused
head runs it (its own tile shape, vendor BLAS, this machine's threads) and the naive path end to end, and prints

* ``bound``: the GEMM time alone of fwd + recompute(1 - k) + grad_H + grad_W (no softmax, exp or memory traffic);
* ``naive``: the naive path's measured fwd+bwd time;
* ``fastdpo``: ``linear_token_logprobs`` fwd+bwd measured the same way.

When ``bound > naive`` no implementation within the budget can match naive's time on this device. Timings are the
median of ``--repeats`` runs after one warm-up; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(tokens: int, hidden: int, vocab: int, budget_mb: float, repeats: int) -> dict[str, Any]:
    """Measure the GEMM parts, the naive path and fastdpo (fp32, CPU); return the figures (seconds, bytes)."""
    from fastdpo.benchmarks.impls import Shape, make_problem, naive_head
    from fastdpo.head.function import linear_token_logprobs
    from fastdpo.head.plan import _plan

    n, d, v = tokens, hidden, vocab
    device = torch.device("cpu")
    p = make_problem("head", Shape(n, d, v), torch.float32, device)
    h, w, labels, up = p.inputs["hidden"], p.inputs["weight"], p.inputs["labels"], p.upstream
    tok, voc = _plan(n, v, device)
    tiles = (n / tok) * (v / voc)
    hd, wt = h.detach()[:tok], w.detach()[:voc]
    z = torch.empty(tok, voc)
    gz = torch.randn(tok, voc)
    gemm = {
        "logits": tiles * _median_s(lambda: torch.mm(hd, wt.t(), out=z), repeats),
        "grad_hidden": tiles * _median_s(lambda: gz @ wt, repeats),
        "grad_weight": tiles * _median_s(lambda: gz.t() @ hd, repeats),
    }
    logits_bytes = 4.0 * n * v
    keep = min(1.0, budget_mb * 2**20 / logits_bytes)
    bound = gemm["logits"] * (2.0 - keep) + gemm["grad_hidden"] + gemm["grad_weight"]

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            h.grad = w.grad = None
            fn().backward(up)

        return run

    naive = _median_s(step(lambda: naive_head(h, w, labels)), repeats)
    fast = _median_s(step(lambda: linear_token_logprobs(h, w, labels, validate=False).logprobs), repeats)
    flop = 2.0 * n * d * v
    return {
        "shape": {"tokens": n, "hidden": d, "vocab": v},
        "tile": [tok, voc],
        "threads": torch.get_num_threads(),
        "budget_mb": budget_mb,
        "kept_fraction": keep,
        "gemm_s": gemm,
        "gemm_gflops": {k: flop / s / 1e9 for k, s in gemm.items()},
        "bound_s": bound,
        "naive_s": naive,
        "fastdpo_s": fast,
        "bound_over_naive": bound / naive,
        "fastdpo_over_naive": fast / naive,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.benchmarks.head_bound", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--budget-mb", type=float, default=250.0, help="extra memory allowed for kept logits (MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.tokens, args.hidden, args.vocab, args.budget_mb, args.repeats)
    for name, s in r["gemm_s"].items():
        print(
            f"GEMM {name:12s} {s:7.2f} s  {r['gemm_gflops'][name]:6.1f} GFLOP/s  (tile {r['tile'][0]}x{r['tile'][1]})"
        )
    print(f"budget {args.budget_mb:g} MiB keeps {100 * r['kept_fraction']:.1f}% of the logits")
    print(
        f"bound   (GEMMs only: 2-k logits + grad_hidden + grad_weight) {r['bound_s']:7.2f} s "
        f"= {r['bound_over_naive']:.2f}x naive"
    )
    print(f"naive   (measured fwd+bwd)                                  {r['naive_s']:7.2f} s")
    print(
        f"fastdpo (measured fwd+bwd)                                  {r['fastdpo_s']:7.2f} s "
        f"= {r['fastdpo_over_naive']:.2f}x naive"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
