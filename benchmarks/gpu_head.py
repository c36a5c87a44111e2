"""Section ``head`` of the one-shot GPU run: the fused LM head against naive PyTorch and the peers, bf16.

Case: per-token log-probs of ``hidden @ weight.T`` with ``hidden [N, D]``, ``weight [V, D]`` (both requiring grad),
labels ``[N]`` in ``[0, V)`` and a random fp32 upstream gradient ``[N]``; forward + backward (``autograd.grad`` of
both inputs). D = 4096, N = 8192, V in {128256, 151936}. Inputs come from ``fastdpo.benchmarks.impls.make_problem``
and the implementations from its registry, like the CPU benchmark:

* ``naive`` — materialized bf16 logits, ``log_softmax`` in fp32, gather;
* ``fastdpo`` — ``fastdpo.linear_token_logprobs`` (tiled projection, recompute in backward);
* ``trl`` — TRL 1.16's ``ChunkedLogProbFunction`` (what ``DPOTrainer``'s fused LM head runs);
* ``liger`` — ``LigerFusedLinearCrossEntropyLoss(reduction="none")``: the like-for-like Liger op (per-token ``-log p``
  under any per-token upstream gradient). ``LigerFusedLinearDPOLoss`` is a different workload (it adds the reference
  forward and the loss) and is ``torch.compile``-d by default;
* ``cce`` — ``cut_cross_entropy.linear_cross_entropy(reduction="none")`` (per-token ``-log p``), its defaults
  (``filter_eps="high"``: gradient entries below the threshold are skipped).

TFLOP/s count the useful ``6*N*D*V`` FLOPs (logits, d hidden, d weight: three ``2*N*D*V`` GEMMs) for every
implementation, recompute or not. The ceiling, measured in the same run on the same shapes: ``torch.mm`` for those
three GEMMs (``hidden @ weight.T``, ``G @ weight``, ``G.T @ hidden`` with a random bf16 ``G [N, V]``);
``% mm`` = TFLOP/s / that rate.

Correctness, per implementation: log-probs and d hidden of rows {0, 1, N/2, N-1} against float64 on the CPU; d weight of
vocabulary rows {0, V-1, labels[0], labels[N-1]} against float64 computed on the device (it needs every row's
logsumexp: ``2*N*D*V`` float64 FLOPs, ~0.2 s on the device, hours on the host); naive = the ``naive`` row's values.

Time estimate per V (H100, 790 TFLOP/s): one step is 6NDV = 25.8 TFLOP (V=128256) / 30.6 TFLOP (V=151936), 33 / 39 ms
at the GEMM ceiling; each implementation runs ``warmup + repeats`` steps at an assumed 1.4-2x that, plus Triton
compilation on the first V, plus the float64 reference (weights to the host and to float64: ~6 GB of host traffic).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdpo.benchmarks.gpu_accuracy import HEAD_REL_TOL, check, summarize
from fastdpo.benchmarks.gpu_measure import H100, Context, time_op, time_passes
from fastdpo.benchmarks.gpu_peers import skip_reason
from fastdpo.benchmarks.impls import Shape, get_impl, make_problem

SECTION = "head"
DTYPE = torch.bfloat16
IMPLS = ("naive", "fastdpo", "trl", "liger", "cce")
# assumed step time over the 3-GEMM ceiling (estimates only) and first-use compile seconds
SLOWDOWN = {"naive": 1.5, "fastdpo": 1.4, "trl": 1.7, "liger": 1.7, "cce": 2.0}
COMPILE_S = {"naive": 1.0, "fastdpo": 8.0, "trl": 1.0, "liger": 8.0, "cce": 15.0}
CASE_OVERHEAD_S = 1.0
REF_ROWS_CHUNK = 1024


def shapes(dry_run: bool) -> tuple[int, int, list[int]]:
    """``(N, D, vocabularies)``."""
    return (32, 16, [300, 1000]) if dry_run else (8192, 4096, [128256, 151936])


def _step_s(n: int, d: int, v: int) -> float:
    return 6.0 * n * d * v / (H100.bf16_tflops * 1e12)


def estimates(n: int, d: int, v: int, calls: int, first_v: bool) -> dict[str, float]:
    """Seconds per case of one vocabulary: ``mm``, ``reference`` and each implementation."""
    out = {
        "mm": calls * _step_s(n, d, v) + 2.0 * n * v / (H100.copy_gbps * 1e9) + CASE_OVERHEAD_S,
        "reference": (
            10.0 * v * d / (H100.cpu_gbps * 1e9) + 2.0 * n * d * v / (H100.fp64_tflops * 1e12) + CASE_OVERHEAD_S
        ),
    }
    for name in IMPLS:
        out[name] = calls * SLOWDOWN[name] * _step_s(n, d, v) + CASE_OVERHEAD_S + (COMPILE_S[name] if first_v else 0.0)
    return out


def plan(dry_run: bool, calls: int, peers: dict[str, str]) -> dict[str, Any]:
    """Case count, TFLOP per step and the estimated seconds (``calls`` = warm-up + timed per case)."""
    n, d, vs = shapes(dry_run)
    total = sum(sum(estimates(n, d, v, calls, i == 0).values()) for i, v in enumerate(vs))
    return {
        "cases": len(vs) * (len(IMPLS) + 2),
        "tflop_per_step": [round(6.0 * n * d * v / 1e12, 1) for v in vs],
        "estimate_s": round(total, 1),
    }


def run(ctx: Context) -> None:
    n, d, vs = shapes(ctx.dry_run)
    for i, v in enumerate(vs):
        _run_vocab(ctx, n, d, v, estimates(n, d, v, ctx.warmup + ctx.repeats, i == 0))


def _run_vocab(ctx: Context, n: int, d: int, v: int, est: dict[str, float]) -> None:
    """The cases of one vocabulary size: inputs + the torch.mm ceiling, the float64 reference, each implementation."""
    state: dict[str, Any] = {}
    base = {"section": SECTION, "dtype": "bfloat16", "N": n, "D": d, "V": v}
    ctx.run_case({**base, "impl": "torch.mm"}, est["mm"], lambda: _mm_case(ctx, n, d, v, state))
    if "problem" not in state:
        return
    ctx.run_case({**base, "impl": "float64 reference"}, est["reference"], lambda: _reference_case(state))
    for name in IMPLS:
        reason = skip_reason(name, ctx.peers)
        if reason is None:
            unavailable = get_impl("head", name).unavailable(ctx.device)
            reason = None if unavailable is None else "skipped: " + unavailable.removeprefix("unavailable: ")
        if reason is not None:
            ctx.skip({**base, "impl": name}, reason)
            continue
        ctx.run_case({**base, "impl": name}, est[name], lambda name=name: _impl_case(ctx, name, state))


def _mm_case(ctx: Context, n: int, d: int, v: int, state: dict[str, Any]) -> dict[str, Any]:
    """Draw the case's inputs (kept in ``state`` for the implementations) and measure the 3-GEMM ceiling."""
    device = ctx.device
    problem = make_problem("head", Shape(n, d, v), DTYPE, device, seed=v)
    state["problem"] = problem
    a, w = problem.inputs["hidden"].detach(), problem.inputs["weight"].detach()
    g = torch.randn(n, v, device=device, dtype=DTYPE)
    kw = {"device": device, "warmup": ctx.warmup, "repeats": ctx.repeats}
    mm_ms = time_op(lambda: a @ w.T, **kw) + time_op(lambda: g @ w, **kw) + time_op(lambda: g.T @ a, **kw)
    state["mm_tflops"] = 6.0 * n * d * v / mm_ms / 1e9
    return {"step_ms": mm_ms, "tflops": state["mm_tflops"], "mm_tflops": state["mm_tflops"], "pct_mm": 100.0}


def _reference_case(state: dict[str, Any]) -> dict[str, Any]:
    """float64 values of the checked slices: log-probs and d hidden of a few rows (host), d weight of a few vocabulary
    rows (device: every row's logsumexp is needed)."""
    p = state["problem"]
    hidden, weight = p.inputs["hidden"].detach(), p.inputs["weight"].detach()
    labels, up = p.inputs["labels"], p.upstream
    n, v = hidden.shape[0], weight.shape[0]
    rows = torch.tensor(sorted({0, 1, n // 2, n - 1}), device=hidden.device)
    vrows = torch.unique(
        torch.stack(
            [torch.tensor(0, device=labels.device), torch.tensor(v - 1, device=labels.device), labels[0], labels[n - 1]]
        )
    )
    w64 = weight.to("cpu").double()
    h64 = hidden[rows].to("cpu").double().requires_grad_()
    out = torch.log_softmax(h64 @ w64.T, -1).gather(-1, labels[rows].cpu()[:, None])[:, 0]
    (dh,) = torch.autograd.grad(out, h64, up[rows].cpu().double())
    del w64
    w64d, h64d = weight.double(), hidden.double()
    dw = torch.zeros(len(vrows), hidden.shape[1], dtype=torch.float64, device=hidden.device)
    for s in range(0, n, REF_ROWS_CHUNK):  # dW[v] = sum_n up_n (1[label_n = v] - p_nv) h_n
        logits = h64d[s : s + REF_ROWS_CHUNK] @ w64d.T
        p_sel = torch.exp(logits[:, vrows] - torch.logsumexp(logits, -1, keepdim=True))
        onehot = (labels[s : s + REF_ROWS_CHUNK, None] == vrows[None, :]).double()
        dw += (up[s : s + REF_ROWS_CHUNK, None].double() * (onehot - p_sel)).T @ h64d[s : s + REF_ROWS_CHUNK]
        del logits
    state["rows"], state["vrows"] = rows, vrows
    state["ref"] = (out.detach(), dh, dw.cpu())
    return {"rows": rows.tolist(), "vocab_rows": vrows.tolist()}


def _impl_case(ctx: Context, name: str, state: dict[str, Any]) -> dict[str, Any]:
    p = state["problem"]
    impl = get_impl("head", name)
    hidden, weight = p.inputs["hidden"], p.inputs["weight"]
    n, d, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    passes, out, (dh, dw) = time_passes(
        impl.build(p, ctx.device),
        lambda o: torch.autograd.grad(o, (hidden, weight), p.upstream),
        device=ctx.device,
        warmup=ctx.warmup,
        repeats=ctx.repeats,
    )
    rec: dict[str, Any] = {
        **passes.as_record(),
        "impl_label": impl.label(ctx.device),
        "tflops": 6.0 * n * d * v / passes.step_ms / 1e9,
    }
    if "mm_tflops" in state:
        rec["mm_tflops"] = state["mm_tflops"]
        rec["pct_mm"] = 100.0 * rec["tflops"] / state["mm_tflops"]
    if "ref" not in state:
        return {**rec, "check": "n/a", "errors": "float64 reference unavailable"}
    rows, vrows = state["rows"], state["vrows"]
    got = (out.detach()[rows].float(), dh[rows], dw[vrows])
    if name == "naive":
        state["naive"] = tuple(t.cpu() for t in got)
    if "naive" not in state:
        return {**rec, "check": "n/a", "errors": "naive row unavailable (the rule compares against it)"}
    quantities = zip(("out", "d_hidden", "d_weight"), got, state["naive"], state["ref"], strict=True)
    rec.update(summarize([check(q, r, nv, ref, HEAD_REL_TOL[DTYPE]) for q, r, nv, ref in quantities]))
    return rec
