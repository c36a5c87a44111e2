"""Shapes with more than 2**31 logits: offsets must be int64 everywhere (``N * V`` overflows int32 at real sizes).

- CPU, torch path: the fused head on ``N = 16400`` tokens x ``V = 131072`` (``N * V = 2.15e9 > 2**31``) with a tiny
  hidden size (``D = 4``) so the GEMMs are cheap; forward, and forward + backward with an upstream gradient that is
  non-zero only on the checked rows. Rows on both sides of the 2**31 boundary are checked against float64.
- CUDA (``gpu`` tests, run by ``pytest -m gpu``): the compiled Triton kernels, forward and backward — the log-prob
  kernel on bf16 logits ``[17000, 131072]`` and the fused head — compared with float64 on rows beyond the boundary,
  within the naive same-dtype path's error (the suite's rule). The upstream gradient is non-zero only on the checked
  rows, so the float64 weight gradient is cheap to form exactly.
"""

from __future__ import annotations

import pytest
import torch

from fastdpo.reference import assert_within_naive, naive_token_logprobs

V = 131072
BOUNDARY_ROW = 2**31 // V  # first row whose flat offset row * V reaches 2**31


def _check_rows(n: int, seed: int) -> torch.Tensor:
    """Rows to compare: the first, both sides of the int32 boundary, the last, and a few random ones."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.tensor([0, 1, BOUNDARY_ROW - 1, BOUNDARY_ROW, BOUNDARY_ROW + 1, n - 2, n - 1])
    return torch.unique(torch.cat([fixed, torch.randint(0, n, (9,), generator=g)]))


def _ref_rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float64 log-prob of ``labels[rows]`` under ``hidden[rows] @ weight.T``."""
    z = hidden[rows].double() @ weight.double().T
    return naive_token_logprobs(z, labels[rows])


def _naive_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    gout: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax + gather on the checked ``rows`` only, in ``dtype``, backward of ``gout[rows]``: (log-probs,
    gradient of those hidden rows, weight gradient)."""
    h = hidden.detach()[rows].to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    lp = naive_token_logprobs(h @ w.T, labels[rows])
    lp.backward(gout[rows].to(dtype))
    assert h.grad is not None and w.grad is not None
    return lp.detach(), h.grad, w.grad


def test_fused_head_beyond_int32_cpu() -> None:
    from fastdpo import linear_token_logprobs

    n, d = 16400, 4
    assert n * V > 2**31
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g) * 2
    weight = torch.randn(V, d, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    rows = _check_rows(n, 1)
    # make the checked rows' labels the most likely tokens of a few rows so that errors are not hidden by tiny probs
    labels[rows[::2]] = torch.argmax(hidden[rows[::2]] @ weight.T, dim=1)
    with torch.no_grad():
        out = linear_token_logprobs(hidden, weight, labels, backend="torch").logprobs
    assert out.shape == (n,) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out <= 0).all()
    ref = _ref_rows(hidden, weight, labels, rows)
    torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=2e-4)


def test_fused_head_beyond_int32_cpu_backward() -> None:
    """Gradients through the torch path at N * V > 2**31: hidden rows and the whole weight gradient vs float64."""
    from fastdpo import linear_token_logprobs

    n, d = 16400, 4
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(n, d, generator=g) * 2).requires_grad_(True)
    weight = torch.randn(V, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    rows = _check_rows(n, 3)
    gout = torch.zeros(n)
    gout[rows] = torch.linspace(-1.0, 1.0, rows.numel())
    out = linear_token_logprobs(hidden, weight, labels, backend="torch", keep_logits_bytes=0).logprobs
    out.backward(gout)
    ref, ref_h, ref_w = _naive_rows(hidden, weight, labels, rows, gout, torch.float64)
    _, naive_h, naive_w = _naive_rows(hidden, weight, labels, rows, gout, torch.float32)
    torch.testing.assert_close(out.detach()[rows].double(), ref, rtol=1e-5, atol=2e-4)
    assert hidden.grad is not None and weight.grad is not None
    others = torch.ones(n, dtype=torch.bool)
    others[rows] = False
    assert (hidden.grad[others] == 0).all()  # an int32 wrap would scatter gradient into other rows
    # error vs float64 no larger than the naive fp32 path's (an offset bug gives O(1) errors)
    err_h = (hidden.grad[rows].double() - ref_h).abs().max()
    err_w = (weight.grad.double() - ref_w).abs().max()
    assert err_h <= 2 * (naive_h - ref_h).abs().max() + 1e-6, err_h
    assert err_w <= 2 * (naive_w - ref_w).abs().max() + 1e-6, err_w


def _assert_within_naive(
    name: str, got: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor, groups: dict[str, torch.Tensor]
) -> None:
    """The suite's rule (:func:`fastdpo.reference.assert_within_naive`: ``|got - ref| <= |naive - ref| + tol``, for
    half precision one more rounding to that dtype: the kernel stores an fp32 result once, the naive path's own final
    rounding can be luckier on a handful of entries), per group of entries.

    Groups keep small entries visible: a vocabulary row's softmax gradient is ~1/V (~1e-5) next to O(1) label
    entries, so a single max over both would let any error on the small ones hide under the label entries' rounding.
    """
    for group, mask in groups.items():
        assert_within_naive(f"{name} [{group}]", got[mask], naive[mask], ref[mask])


def _label_groups(labels: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``{"label": entries [i, labels[i]], "other": the rest}`` of a ``[rows, V]`` gradient."""
    onehot = torch.zeros(shape, dtype=torch.bool, device=labels.device)
    onehot[torch.arange(shape[0], device=labels.device), labels] = True
    return {"label": onehot, "other": ~onehot}


@pytest.mark.gpu
def test_logprob_kernel_beyond_int32_cuda() -> None:
    """bf16 logits ``[17000, 131072]`` (``N * V > 2**31``) through the compiled log-prob kernel: the checked rows'
    log-probs and logit gradients against float64, within the naive bf16 path's error (label and other entries
    separately), and exactly zero gradient everywhere else (an int32 wrap would scatter it into other rows)."""
    from fastdpo import sequence_logprobs

    n = 17000
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, V, generator=g, device=dev) * 3).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g, device=dev)
    rows = _check_rows(n, 2).to(dev)
    seg = torch.arange(n, device=dev)  # one segment per row: per-row log-probs
    gout = torch.zeros(n, device=dev)
    gout[rows] = torch.linspace(-1, 1, rows.numel(), device=dev)
    out = sequence_logprobs(logits, labels, segment_ids=seg, num_segments=n, backend="triton")
    out.backward(gout)

    def naive_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.detach()[rows].to(dtype).requires_grad_(True)
        lp = naive_token_logprobs(x, labels[rows])
        lp.backward(gout[rows].to(dtype))
        assert x.grad is not None
        return lp.detach(), x.grad

    ref, ref_grad = naive_rows(torch.float64)
    naive, naive_grad = naive_rows(torch.bfloat16)  # the naive path in the kernel's dtype
    _assert_within_naive("log-probs", out.detach()[rows], naive, ref, {"all": torch.ones_like(ref, dtype=torch.bool)})
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    _assert_within_naive(
        "logits.grad", logits.grad[rows], naive_grad, ref_grad, _label_groups(labels[rows], tuple(ref_grad.shape))
    )
    others = torch.ones(n, dtype=torch.bool, device=dev)
    others[rows] = False
    assert (logits.grad[others] == 0).all()


@pytest.mark.gpu
def test_fused_head_beyond_int32_cuda() -> None:
    """The fused head (Triton fold kernels, vendor GEMMs) at ``N * V > 2**31`` tokens x vocabulary, fp32: log-probs,
    hidden and weight gradients of the checked rows against float64, within the naive fp32 path's error."""
    from fastdpo import linear_token_logprobs

    n, d = 17000, 64
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(n, d, generator=g, device=dev) * 0.3).requires_grad_(True)
    weight = (torch.randn(V, d, generator=g, device=dev) * 0.3).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g, device=dev)
    rows = _check_rows(n, 3).to(dev)
    gout = torch.zeros(n, device=dev)
    gout[rows] = torch.linspace(-1, 1, rows.numel(), device=dev)
    out = linear_token_logprobs(hidden, weight, labels, backend="triton").logprobs
    out.backward(gout)
    ref, ref_h, ref_w = _naive_rows(hidden, weight, labels, rows, gout, torch.float64)
    naive, naive_h, naive_w = _naive_rows(hidden, weight, labels, rows, gout, torch.float32)
    everything = {"all": torch.ones_like(ref, dtype=torch.bool)}
    _assert_within_naive("log-probs", out.detach()[rows], naive, ref, everything)
    assert hidden.grad is not None and weight.grad is not None
    _assert_within_naive(
        "hidden.grad", hidden.grad[rows], naive_h, ref_h, {"all": torch.ones_like(ref_h, dtype=torch.bool)}
    )
    label_rows = torch.zeros(V, dtype=torch.bool, device=dev)
    label_rows[labels[rows]] = True  # weight rows of the checked labels carry the O(1) part of the gradient
    _assert_within_naive(
        "weight.grad",
        weight.grad,
        naive_w,
        ref_w,
        {"label rows": label_rows[:, None].expand(V, d), "other rows": ~label_rows[:, None].expand(V, d)},
    )
    others = torch.ones(n, dtype=torch.bool, device=dev)
    others[rows] = False
    assert (hidden.grad[others] == 0).all()
