"""Section ``logprobs`` of the one-shot GPU run: ``fastdpo.sequence_logprobs`` from logits, forward and backward.

Case: logits ``[B, T, V]`` (``T = 256``, ``B = N / T``; N(0, 2^2) values, drawn on the device), labels ``[B, T]`` with
the first quarter of every row ``-100`` (the prompt) and row 1 entirely ``-100`` (a sequence with no completion
token), a random fp32 upstream gradient ``[B]``. dtypes bf16 and fp32; N in {4096, 16384}; V in {32000, 128256,
151936}.

Bytes each pass must move (``e`` = bytes per logit): forward reads the logits and the int64 labels,
``N*V*e + 8*N``; backward reads the logits and writes their gradient, ``2*N*V*e + 8*N``. GB/s = bytes / median time.
The ceiling is measured in the same case: ``logits.clone()`` moves ``2*N*V*e`` bytes; ``% copy`` = achieved GB/s /
clone GB/s.

Correctness: sequences 0, 1 and B-1 (the last one sits at the largest offsets, where 32-bit indexing would break)
against ``naive_sequence_logprobs`` in float64 on the CPU, gradient included; naive = the same function on the device
in the logits dtype.

Time estimate per case (H100): ``(warmup + repeats) * 5*N*V*e`` bytes at the copy rate (forward 1x, backward 2x,
clone 2x the logits), input generation, the float64 slice on the host, plus Triton compilation on the first case of
each dtype. Largest case (N=16384, V=151936, fp32): 9.96 GB of logits, 50 GB per repeat, ~17 ms at 3 TB/s.
"""

from __future__ import annotations

from typing import Any

import torch

from fastdpo.benchmarks.gpu_accuracy import LOGPROBS_REL_TOL, check, interpreter_bf16_slack, summarize
from fastdpo.benchmarks.gpu_measure import H100, Context, time_op, time_passes

SECTION = "logprobs"
DTYPES = (torch.bfloat16, torch.float32)
COMPILE_S = 8.0  # first case of a dtype: Triton compiles the forward, backward and segment-sum kernels
CASE_OVERHEAD_S = 1.0


def shapes(dry_run: bool) -> tuple[int, list[int], list[int]]:
    """``(T, token counts N, vocabularies V)``."""
    if dry_run:
        return 16, [48], [100, 300]
    return 256, [4096, 16384], [32000, 128256, 151936]


def estimate_s(n: int, v: int, dtype: torch.dtype, t: int, calls: int, first_of_dtype: bool) -> float:
    e = dtype.itemsize
    device_bytes = calls * 5.0 * n * v * e + 3.0 * n * v * 4  # timed/warm passes + drawing the inputs
    host = 3 * t * v * 8 * 8 / (H100.cpu_gbps * 1e9)  # ~8 float64 passes over the 3-sequence slice
    return device_bytes / (H100.copy_gbps * 1e9) + host + CASE_OVERHEAD_S + (COMPILE_S if first_of_dtype else 0.0)


def plan(dry_run: bool, calls: int, peers: dict[str, str]) -> dict[str, Any]:
    """Case count, bytes moved on the device and the estimated seconds (``calls`` = warm-up + timed per case)."""
    t, ns, vs = shapes(dry_run)
    total, cases, gbytes = 0.0, 0, 0.0
    for dtype in DTYPES:
        for i, n in enumerate(ns):
            for j, v in enumerate(vs):
                total += estimate_s(n, v, dtype, t, calls, i == 0 and j == 0)
                gbytes += calls * 5.0 * n * v * dtype.itemsize / 1e9
                cases += 1
    return {"cases": cases, "device_GB_moved": round(gbytes, 1), "estimate_s": round(total, 1)}


def run(ctx: Context) -> None:
    t, ns, vs = shapes(ctx.dry_run)
    calls = ctx.warmup + ctx.repeats
    for dtype in DTYPES:
        for i, n in enumerate(ns):
            for j, v in enumerate(vs):
                base = {
                    "section": SECTION,
                    "impl": "fastdpo",
                    "dtype": str(dtype).removeprefix("torch."),
                    "N": n,
                    "T": t,
                    "V": v,
                }
                ctx.run_case(
                    base,
                    estimate_s(n, v, dtype, t, calls, i == 0 and j == 0),
                    lambda n=n, v=v, dtype=dtype: _case(ctx, n, v, t, dtype),
                )


def _case(ctx: Context, n: int, v: int, t: int, dtype: torch.dtype) -> dict[str, Any]:
    from fastdpo.logprobs import naive_sequence_logprobs, sequence_logprobs

    device = ctx.device
    b = n // t
    g = torch.Generator(device=device).manual_seed(n * 7 + v)
    logits = torch.randn(b, t, v, generator=g, device=device, dtype=dtype).mul_(2.0).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g, device=device)
    labels[:, : t // 4] = -100
    labels[1] = -100
    upstream = torch.randn(b, generator=g, device=device)

    passes, out, grad = time_passes(
        lambda: sequence_logprobs(logits, labels, validate=False),
        lambda o: torch.autograd.grad(o, logits, upstream)[0],
        device=device,
        warmup=ctx.warmup,
        repeats=ctx.repeats,
    )
    e = logits.element_size()
    copy_ms = time_op(lambda: logits.detach().clone(), device=device, warmup=ctx.warmup, repeats=ctx.repeats)
    fwd_bytes, bwd_bytes, copy_bytes = n * v * e + 8 * n, 2 * n * v * e + 8 * n, 2 * n * v * e
    copy_gbps = copy_bytes / copy_ms / 1e6
    rec: dict[str, Any] = {
        **passes.as_record(),
        "impl_label": _label(device),
        "fwd_bytes": fwd_bytes,
        "bwd_bytes": bwd_bytes,
        "copy_ms": copy_ms,
        "copy_gbps": copy_gbps,
        "fwd_gbps": fwd_bytes / passes.fwd_ms / 1e6,
        "bwd_gbps": bwd_bytes / passes.bwd_ms / 1e6,
    }
    rec["fwd_pct_copy"] = 100.0 * rec["fwd_gbps"] / copy_gbps
    rec["bwd_pct_copy"] = 100.0 * rec["bwd_gbps"] / copy_gbps

    rows = torch.tensor([0, 1, b - 1], device=device)
    x_rows, l_rows, up_rows = logits.detach()[rows], labels[rows], upstream[rows]
    x64 = x_rows.to("cpu", torch.float64).requires_grad_()
    ref = naive_sequence_logprobs(x64, l_rows.cpu())
    (ref_grad,) = torch.autograd.grad(ref, x64, up_rows.cpu().double())
    xn = x_rows.clone().requires_grad_()
    naive = naive_sequence_logprobs(xn, l_rows)
    (naive_grad,) = torch.autograd.grad(naive, xn, up_rows)
    gmax = ref_grad.abs().max().item()
    rec.update(
        summarize(
            [
                check("out", out.detach()[rows], naive.detach(), ref.detach(), LOGPROBS_REL_TOL),
                check(
                    "grad",
                    grad[rows],
                    naive_grad,
                    ref_grad,
                    LOGPROBS_REL_TOL,
                    scale=gmax,
                    slack=interpreter_bf16_slack(dtype, gmax),
                ),
            ]
        )
    )
    return rec


def _label(device: torch.device) -> str:
    from fastdpo._dispatch import resolve_backend

    return f"fastdpo[{resolve_backend('auto', device)}]"
