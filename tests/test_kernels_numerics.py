"""Kernel numerics through the Triton interpreter: masked vocabulary tiles, out-of-range labels with validation off,
every row-alignment path of the vector loop, the launch parameters the GPU itself uses, and the precision contract of
the half-precision head.

Accuracy rule (the suite's): error against a float64 reference no larger than the naive PyTorch path's error in the
same dtype plus a small tolerance. References here are written out in the test (``torch.log_softmax`` of explicit
logits), independent of the library's own naive helpers.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from helpers import STAT_FLAGS, explicit_logits

import fastdpo._launch as launch_mod
from fastdpo import linear_token_logprobs, token_logprobs
from fastdpo.head.plan import _plan
from fastdpo.head.tiles import _mm_acc

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels through the interpreter")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
IGNORE = -100


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _oracle(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, gout: torch.Tensor, **transform: Any
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Per-token log-probs and the gradients of ``sum(gout * logp)``: plain autograd through ``log_softmax`` of the
    explicit logits, in the inputs' own dtype (fp32 math for the softmax of half logits, like the models do)."""
    params = [p.detach().clone().requires_grad_(True) if p is not None else None for p in (h, w, b)]
    z = explicit_logits(params[0], params[1], params[2], **transform)
    logsm = torch.log_softmax(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), dim=-1)
    logp = logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    grads = torch.autograd.grad((logp * gout.to(logp.dtype)).sum(), [p for p in params if p is not None])
    it = iter(grads)
    return logp.detach(), [next(it) if p is not None else None for p in params]


# ----------------------------------------------------------------------------------------------------------------
# masked vocabulary (a whole tile of -inf logits): issue 13 item 2
# ----------------------------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 1.3, "temperature": 0.7}])
def test_fused_head_whole_masked_tiles_stay_finite(transform: dict) -> None:
    gen = torch.Generator().manual_seed(11)
    n, d, vocab = 7, 16, 64
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * 0.5
    b = torch.randn(vocab, generator=gen) * 0.3
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[0:16] = True  # the first vocabulary tile entirely (chunk 16): the fold's very first tile is all -inf
    masked[32:48] = True  # a middle tile
    masked[-5:] = True  # padded ids at the end
    b[masked] = float("-inf")
    allowed = (~masked).nonzero().squeeze(1)
    labels = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
    gout = torch.randn(n, generator=gen)

    params = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out = linear_token_logprobs(
        *params[:2], labels, bias=params[2], token_tile=4, vocab_tile=16, backend="triton", **STAT_FLAGS, **transform
    )
    grads = torch.autograd.grad((out.logprobs * gout).sum(), params)

    ref, ref_grads = _oracle(h.double(), w.double(), b.double(), labels, gout.double(), **transform)
    naive, naive_grads = _oracle(h, w, b, labels, gout, **transform)
    assert torch.isfinite(out.logprobs).all()
    assert _err(out.logprobs, ref) <= _err(naive, ref) + 2e-5 * max(1.0, ref.abs().max().item())
    with torch.no_grad():  # statistics of the float64 logits; 0 * log 0 = 0 for the masked ids
        z64 = explicit_logits(h.double(), w.double(), b.double(), **transform)
        p64 = torch.softmax(z64, dim=-1)
        entropy = torch.special.entr(p64).sum(-1)
        log_sum_p2 = torch.logsumexp(2 * torch.log_softmax(z64, -1), -1)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.log_sum_p2).all()
    assert _err(out.entropy, entropy) <= 1e-4 * max(1.0, entropy.abs().max().item())
    assert _err(out.log_sum_p2, log_sum_p2) <= 1e-4 * max(1.0, log_sum_p2.abs().max().item())
    assert torch.all(out.mean_logit == float("-inf"))  # the mean of logits that include -inf
    assert torch.equal(out.argmax_hit, z64.argmax(-1) == labels)
    for name, g, g_ref, g_naive in zip(("hidden", "weight", "bias"), grads, ref_grads, naive_grads):
        assert torch.isfinite(g).all(), name
        assert _err(g, g_ref) <= _err(g_naive, g_ref) + 2e-5 * max(1.0, g_ref.abs().max().item()), name
    assert torch.all(grads[2][masked] == 0)


# ----------------------------------------------------------------------------------------------------------------
# labels outside [0, V) with validate=False: issue 13 item 12
# ----------------------------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_logprobs_out_of_range_labels_give_nan_and_zero_gradient(label_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab = 37
    logits = torch.randn(2, 6, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (2, 6), generator=gen)
    bad_values = [vocab, 10**6, -7, 2**31 - 1] + ([2**40] if label_dtype == torch.int64 else [])
    bad = torch.zeros(2, 6, dtype=torch.bool)
    for i, v in enumerate(bad_values):
        labels.view(-1)[2 * i] = v
        bad.view(-1)[2 * i] = True
    labels[1, 5] = IGNORE
    labels = labels.to(label_dtype)
    x = logits.clone().requires_grad_(True)
    out = token_logprobs(x, labels, validate=False, backend="triton", block_v=16)
    assert torch.isnan(out[bad]).all()
    assert out[1, 5] == 0
    good = ~bad & (labels != IGNORE)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels.long().clamp(0, vocab - 1).unsqueeze(-1))[..., 0]
    assert _err(out[good], ref[good]) <= 1e-5
    gout = torch.randn(2, 6, generator=gen)
    gout[bad] = float("nan")  # a NaN upstream gradient at those rows must not leak either
    (grad,) = torch.autograd.grad(out, x, grad_outputs=gout)
    assert torch.all(grad[bad] == 0) and torch.all(grad[1, 5] == 0)
    onehot = torch.nn.functional.one_hot(labels.long().clamp(0, vocab - 1), vocab).double()
    grad_ref = gout.double().unsqueeze(-1) * (onehot - torch.softmax(logits.double(), -1))
    assert _err(grad[good], grad_ref[good]) <= 1e-5


@needs_interpreter
def test_fused_head_out_of_range_labels_give_nan_and_zero_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    n, d, vocab = 8, 8, 37
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    bad = torch.tensor([1, 4, 6])
    labels[bad] = torch.tensor([vocab, -3, 10**12])
    params = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    out = linear_token_logprobs(
        *params,
        labels,
        validate=False,
        token_tile=4,
        vocab_tile=16,
        backend="triton",
        return_entropy=True,
        return_argmax_hit=True,
    ).logprobs
    is_bad = torch.zeros(n, dtype=torch.bool)
    is_bad[bad] = True
    assert torch.isnan(out[is_bad]).all() and torch.isfinite(out[~is_bad]).all()
    gout = torch.randn(n, generator=gen)
    gout[bad] = float("nan")
    gh, gw = torch.autograd.grad(out, params, grad_outputs=gout)
    assert torch.all(gh[is_bad] == 0)
    # the remaining rows alone give the same result (the bad rows contribute nothing to the weight gradient)
    keep = (~is_bad).nonzero().squeeze(1)
    ref, (rh, rw, _) = _oracle(h.double()[keep], w.double(), None, labels[keep], gout.double()[keep])
    assert _err(out[keep], ref) <= 1e-5
    assert _err(gh[keep], rh) <= 1e-5 and _err(gw, rw) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# the aligned-vector row walk: head / body / tail, strides, in place and not
# ----------------------------------------------------------------------------------------------------------------


def _layouts(vocab: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    base = torch.randn(2, 6, vocab, generator=gen) * 4
    return {
        "contiguous": base.to(dtype),
        "sliced [:, :-1]": base.to(dtype)[:, :-1],  # rows of another stride than a fresh gradient buffer
        "offset [:, 1:]": base.to(dtype)[:, 1:],  # a base pointer off the 16-byte grid
        "stride_v != 1": torch.randn(vocab, 2, 5, generator=gen).to(dtype).permute(1, 2, 0),
    }


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3, 67, 130])
def test_logprob_kernels_every_row_alignment(dtype: torch.dtype, vocab: int) -> None:
    """V below one vector (the head is the whole row), odd V, several 32-wide blocks plus a partial one; rows on
    and off the 16-byte grid, a non-unit vocabulary stride, gradients in place and into a fresh buffer."""
    gen = torch.Generator().manual_seed(vocab)
    cases = [
        (name, logits, inplace)
        for name, logits in _layouts(vocab, dtype, gen).items()
        for inplace in ((False, True) if name in ("contiguous", "sliced [:, :-1]") else (False,))
    ]
    for name, logits, inplace in cases:
        labels = torch.randint(0, vocab, logits.shape[:2], generator=gen)
        labels[0, 0] = IGNORE
        x64 = logits.double().requires_grad_(True)
        ref = torch.log_softmax(x64, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0]
        ref = torch.where(labels == IGNORE, 0.0, ref)
        gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        (g_ref,) = torch.autograd.grad(ref, x64, grad_outputs=gout)
        xn = logits.clone().requires_grad_(True)
        naive = torch.log_softmax(xn, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0].float()
        naive = torch.where(labels == IGNORE, 0.0, naive)
        (g_naive,) = torch.autograd.grad(naive, xn, grad_outputs=gout.float())
        # inplace_backward needs a non-leaf: route through a differentiable copy
        leaf = logits.clone().requires_grad_(True)
        src = leaf * 1 if inplace else leaf
        out = token_logprobs(src, labels, backend="triton", block_v=32, inplace_backward=inplace)
        (g,) = torch.autograd.grad(out, leaf, grad_outputs=gout.float())
        assert _err(out, ref) <= _err(naive, ref) + 1e-5 * max(1.0, ref.abs().max().item()), name
        assert _err(g, g_ref) <= _err(g_naive, g_ref) + 1e-5 * max(1.0, g_ref.abs().max().item()), name
        assert torch.all(g[0, 0] == 0), name


# ----------------------------------------------------------------------------------------------------------------
# the GPU's own launch parameters (issue 19 item 5)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[launch_mod.KernelLaunch]:
    """Every launch of the test, recorded and run."""
    seen: list[launch_mod.KernelLaunch] = []
    run = launch_mod.launch

    def record(spec: launch_mod.KernelLaunch) -> None:
        seen.append(spec)
        run(spec)

    monkeypatch.setattr(launch_mod, "launch", record)
    for module in ("fastdpo.logprobs", "fastdpo.head.tiles", "fastdpo.segments"):
        monkeypatch.setattr(f"{module}.launch", record)
    return seen


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_with_the_cuda_tiles_and_blocks(dtype: torch.dtype, launches: list) -> None:
    """The engine's variant (STATS + ARGMAX, Gemma-2 softcap) on the tile shape the CUDA planner picks (8192 wide,
    BLOCK_V 1024) and a last tile of V mod 8192 = 1105 columns (GPT-2's 50257 has that remainder), small N."""
    gen = torch.Generator().manual_seed(19)
    n, d, vocab = 3, 16, 8192 + 1105
    tiles = _plan(n, vocab, torch.device("cuda"))
    assert tiles == (3, 8192)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(vocab, d, generator=gen) * 0.4).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    gout = torch.randn(n, generator=gen)
    transform = {"softcap": 30.0, "temperature": 0.9}
    params = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    out = linear_token_logprobs(
        *params, labels, token_tile=tiles[0], vocab_tile=tiles[1], backend="triton", **STAT_FLAGS, **transform
    )
    grads = torch.autograd.grad((out.logprobs * gout).sum(), params)
    folds = [s for s in launches if s.kernel.__name__ == "linear_fold_kernel"]
    grads_k = [s for s in launches if s.kernel.__name__ == "linear_grad_kernel"]
    assert [s.args[0].shape[1] for s in folds] == [8192, 1105]
    assert all(s.constexprs["BLOCK_V"] == 1024 and s.num_warps == 4 for s in folds + grads_k)
    assert all(s.constexprs["STATS"] and s.constexprs["ARGMAX"] and s.constexprs["HAS_SOFTCAP"] for s in folds)
    assert len(grads_k) == 2 and all(s.args[2].dtype == dtype for s in grads_k)  # the GEMM operand dtype

    ref, ref_grads = _oracle(h.double(), w.double(), None, labels, gout.double(), **transform)
    naive, naive_grads = _oracle(h, w, None, labels, gout, **transform)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert _err(out.logprobs, ref) <= _err(naive, ref) + tol * max(1.0, ref.abs().max().item())
    z64 = explicit_logits(h.double(), w.double(), None, **transform)
    assert torch.equal(out.argmax_hit, z64.argmax(-1) == labels)
    mean64 = z64.mean(-1)
    assert _err(out.mean_logit, mean64) <= tol * max(1.0, mean64.abs().max().item())
    for name, g, g_ref, g_naive in zip(("hidden", "weight"), grads, ref_grads, naive_grads):
        assert _err(g, g_ref) <= _err(g_naive, g_ref) + tol * max(1.0, g_ref.abs().max().item()), name


@needs_interpreter
def test_logprob_kernels_with_the_cuda_block(launches: list) -> None:
    """``block_v=None``: the 4096-wide block and 8 warps the GPU runs, over a row of two full blocks and a tail."""
    gen = torch.Generator().manual_seed(23)
    vocab = 2 * 4096 + 37
    logits = (torch.randn(1, 3, vocab, generator=gen) * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, 3), generator=gen)
    x = logits.clone().requires_grad_(True)
    out = token_logprobs(x, labels, backend="triton")
    gout = torch.randn(1, 3, generator=gen)
    (g,) = torch.autograd.grad(out, x, grad_outputs=gout)
    assert {(s.kernel.__name__, s.constexprs["BLOCK_V"], s.num_warps) for s in launches} == {
        ("logprobs_fwd_kernel", 4096, 8),
        ("logprobs_bwd_kernel", 4096, 8),
    }
    x64 = logits.double().requires_grad_(True)
    ref = torch.log_softmax(x64, -1).gather(-1, labels.unsqueeze(-1))[..., 0]
    (g_ref,) = torch.autograd.grad(ref, x64, grad_outputs=gout.double())
    xn = logits.clone().requires_grad_(True)
    naive = torch.log_softmax(xn.float(), -1).gather(-1, labels.unsqueeze(-1))[..., 0]
    (g_naive,) = torch.autograd.grad(naive, xn, grad_outputs=gout)
    assert _err(out, ref) <= _err(naive, ref) + 1e-5
    assert _err(g, g_ref) <= _err(g_naive, g_ref) + 1e-5


# ----------------------------------------------------------------------------------------------------------------
# the half-precision head's precision contract (issue 19 item 2)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_head_gradients_against_float64(dtype: torch.dtype, backend: str) -> None:
    """The logit-gradient tile enters both GEMMs in the weight's dtype with fp32 accumulation (the same contract
    on every device and backend): its gradients keep the naive same-dtype autograd's accuracy."""
    gen = torch.Generator().manual_seed(29)
    n, d, vocab = 19, 24, 150
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(vocab, d, generator=gen) * 0.3).to(dtype)
    b = (torch.randn(vocab, generator=gen) * 0.2).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    gout = torch.randn(n, generator=gen)
    params = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out = linear_token_logprobs(*params[:2], labels, bias=params[2], token_tile=8, vocab_tile=64, backend=backend)
    grads = torch.autograd.grad((out.logprobs * gout).sum(), params)
    ref, ref_grads = _oracle(h.double(), w.double(), b.double(), labels, gout.double())
    naive, naive_grads = _oracle(h, w, b, labels, gout)
    tol = 2e-3 if dtype == torch.bfloat16 else 5e-4
    assert _err(out.logprobs, ref) <= _err(naive, ref) + tol * max(1.0, ref.abs().max().item())
    for name, g, g_ref, g_naive in zip(("hidden", "weight", "bias"), grads, ref_grads, naive_grads):
        assert g.dtype == dtype, name
        assert _err(g, g_ref) <= _err(g_naive, g_ref) + tol * max(1.0, g_ref.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gemm_products_exact_accumulation_fp32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(31)
    a = torch.randn(33, 700, generator=gen).to(dtype)
    b = torch.randn(700, 17, generator=gen).to(dtype)
    out = _mm_acc(a, b, torch.float32)
    assert out.dtype == torch.float32
    exact = a.double() @ b.double()
    bound = 700 * 2.0**-24 * (a.double().abs() @ b.double().abs())  # fp32 accumulation of exact products
    err = (out.double() - exact).abs()
    assert torch.all(err <= bound)
    # a half-precision result (what a plain half GEMM returns) is far less accurate
    assert err.max() < (exact.to(dtype).double() - exact).abs().max() / 50


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_gemm_calls_are_valid_schemas(dtype: torch.dtype) -> None:
    """The fp32-output half GEMMs the CUDA path calls (torch >= 2.8), type-checked on meta tensors."""
    a = torch.empty(8, 16, dtype=dtype, device="meta")
    b = torch.empty(16, 4, dtype=dtype, device="meta")
    assert torch.mm(a, b, out_dtype=torch.float32).dtype == torch.float32
    out = torch.empty(8, 4, dtype=torch.float32, device="meta")
    assert torch.mm(a, b, out_dtype=torch.float32, out=out) is out


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_head_rounds_the_logit_gradient_to_the_weight_dtype(backend: str) -> None:
    """The contract itself: grad_weight = round_bf16(G).T @ hidden summed in fp32, then rounded to bf16 — not the
    product of the unrounded fp32 G (the two differ by whole bf16 ulps)."""
    gen = torch.Generator().manual_seed(37)
    n, d, vocab = 64, 32, 300
    h = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    w = (torch.randn(vocab, d, generator=gen) * 0.3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    ww = w.clone().requires_grad_(True)
    out = linear_token_logprobs(h, ww, labels, token_tile=32, vocab_tile=128, backend=backend).logprobs
    (gw,) = torch.autograd.grad((out * g).sum(), [ww])
    z = h.double() @ w.double().t()
    grad_z = g.double()[:, None] * (torch.nn.functional.one_hot(labels, vocab).double() - torch.softmax(z, 1))
    rounded = (grad_z.to(torch.bfloat16).double().t() @ h.double()).to(torch.bfloat16)
    unrounded = (grad_z.float().double().t() @ h.double()).to(torch.bfloat16)
    assert not torch.equal(rounded, unrounded)
    mismatch = (gw != rounded).double().mean().item()
    assert mismatch <= 0.01, mismatch  # a G element on a rounding tie may land on the other side
    assert (gw != unrounded).double().mean().item() > 10 * max(mismatch, 0.001)
