"""Reliability of the log-prob ops under adversarial use (issue 13 items 1, 2, 5, 12).

* second backward through one graph (``retain_graph=True``, two losses on one forward, ``torch.autograd.grad`` per
  output), double backward (``create_graph=True``), for the fused head (kept logits tiles), grad-in-forward, the
  from-logits op and segment sums;
* a whole vocabulary tile of -inf logits (a padded vocabulary masked through the bias), any tile;
* gradient precision at very large logits;
* ``validate=False`` with labels outside the vocabulary.

Oracle: plain autograd over ``torch.log_softmax`` of explicit logits written here, in float64. Error rule of the
suite: ``|fast - float64| <= |naive same-dtype - float64| + tol``. ``backend="triton"`` runs the kernels through the
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from backends import BACKENDS
from helpers import STAT_FLAGS, explicit_logits

from fastdpo.head import linear_logprobs_loss_grad_in_forward, linear_sequence_logprobs, linear_token_logprobs
from fastdpo.logprobs import sequence_logprobs, token_logprobs
from fastdpo.segments import segment_sum

# tiny shapes: one intra-op thread avoids per-op synchronisation on the shared 2-core runner
pytestmark = pytest.mark.usefixtures("one_thread")


TRANSFORMS = {
    "plain": {},
    "scaled": {"logit_scale": 0.6, "temperature": 1.3},
    "softcap": {"softcap": 4.0, "logit_scale": 1.7, "temperature": 0.8},
}


def explicit_logprobs(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, **transform: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token log-probs, logits z, log_softmax(z))`` from explicit logits in the inputs' dtype (plain autograd);
    ``transform``: ``logit_scale`` / ``softcap`` / ``temperature`` (:func:`helpers.explicit_logits`). Labels -100
    give 0."""
    z = explicit_logits(h, w, b, **transform)
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != -100
    lp = logsm.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, 0.0), z, logsm


def _leaf(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype).requires_grad_(True)


def _data(n: int, d: int, v: int, seed: int, w_scale: float = 0.7, masked: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * w_scale
    b = torch.randn(v, generator=gen) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.randperm(n, generator=gen)[: round(masked * n)]] = -100
    gout = torch.randn(n, generator=gen)
    return h, w, b, labels, gout


def _err(a: torch.Tensor, r: torch.Tensor) -> float:
    return (a.double() - r.double()).abs().max().item()


def _oracle_grads(h, w, b, labels, gout, transform, dtype):
    """Gradients of ``sum(gout * logp)`` wrt (h, w, b) from explicit logits in ``dtype``."""
    p = [_leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)]
    lp, _, _ = explicit_logprobs(p[0], p[1], p[2], labels, **transform)
    params = [t for t in p if t is not None]
    return lp.detach(), list(torch.autograd.grad((lp * gout.to(dtype)).sum(), params))


def _oracles(h, w, b, labels, gout, transform) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float64 oracle, fp32 naive) gradients of ``sum(gout * logp)`` wrt (h, w, b) from explicit logits."""
    return tuple(_oracle_grads(h, w, b, labels, gout, transform, dtype)[1] for dtype in (torch.float64, torch.float32))


def _fp32_leaves(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [_leaf(t, torch.float32) for t in ts]


def _assert_within_naive(fast: list[torch.Tensor], naive: list[torch.Tensor], ref: list[torch.Tensor], tol: float):
    for name, a, nv, r in zip(("hidden", "weight", "bias"), fast, naive, ref):
        scale = max(1.0, r.abs().max().item())
        assert _err(a, r) <= _err(nv, r) + tol * scale, (name, _err(a, r), _err(nv, r))


def _head_node(out: torch.Tensor) -> Any:
    """The fused head's autograd node (its ctx) behind ``out``."""
    stack, seen = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ == "_LinearLogprobsBackward":
            return fn
        stack.extend(f for f, _ in fn.next_functions)
    raise AssertionError("no fused-head node in the graph")


# shapes: 13 tokens (2 token tiles of 8), V = 53 (4 vocabulary tiles of 16, the last one partial)
N, D, V = 13, 8, 53
TILES = {"token_tile": 8, "vocab_tile": 16}
N_TILES = 2 * 4
KEEP = {"default": None, "partial": 3 * 8 * 16 * 4, "none": 0}


def _tiled_head(
    params: list[torch.Tensor],
    labels: torch.Tensor,
    backend: str,
    *,
    op: Any = linear_token_logprobs,
    tiles: dict[str, int] = TILES,
    **kw: Any,
) -> Any:
    """The fused-head ``op`` (token or sequence log-probs) of ``params = [hidden, weight, bias]`` on the ``tiles``
    grid, with ``kw``."""
    return op(params[0], params[1], labels, bias=params[2], **tiles, backend=backend, **kw)


# ---------------------------------------------------------------------------------------------------------------
# item 1: every backward through one graph gives correct gradients (or a clear error)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", list(KEEP))
@pytest.mark.parametrize("transform", ["plain", "softcap"])
def test_head_retain_graph_twice_gives_twice_the_gradient(backend: str, keep: str, transform: str) -> None:
    h, w, b, labels, gout = _data(N, D, V, seed=1)
    params = _fp32_leaves(h, w, b)
    out = _tiled_head(params, labels, backend, keep_logits_bytes=KEEP[keep], **TRANSFORMS[transform]).logprobs
    kept = len(_head_node(out).kept_keys)  # the kept-tile path is really exercised: all, some, none of the tiles
    assert {"default": kept == N_TILES, "partial": 0 < kept < N_TILES, "none": kept == 0}[keep], kept
    loss = (out * gout).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    loss.backward()
    ref, naive = _oracles(h, w, b, labels, gout, TRANSFORMS[transform])
    _assert_within_naive(first, naive, ref, tol=2e-5)
    for p, g1 in zip(params, first):
        torch.testing.assert_close(p.grad, 2 * g1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_two_losses_on_one_forward(backend: str) -> None:
    h, w, b, labels, gout = _data(N, D, V, seed=2)
    gout2 = torch.randn(N, generator=torch.Generator().manual_seed(20))
    params = _fp32_leaves(h, w, b)
    seq = _tiled_head(
        params, labels, backend, op=linear_sequence_logprobs, segment_ids=torch.arange(N) % 3, num_segments=3
    )
    assert len(_head_node(seq).kept_keys) == N_TILES
    tok_out = _tiled_head(params, labels, backend)
    # two losses of one forward, each backward separately (the second one reaches the head node again)
    loss_a = (tok_out.logprobs * gout).sum()
    loss_b = (tok_out.logprobs * gout2).sum()
    loss_a.backward(retain_graph=True)
    loss_b.backward()
    ref, naive = _oracles(h, w, b, labels, gout + gout2, {})
    _assert_within_naive([p.grad for p in params], naive, ref, tol=2e-5)
    # and the sequence-sum graph: two per-sequence losses
    for p in params:
        p.grad = None
    seq[0].backward(retain_graph=True)
    seq[2].backward()
    sel = (torch.arange(N) % 3 != 1).double()
    ref, naive = _oracles(h, w, b, labels, sel, {})
    _assert_within_naive([p.grad for p in params], naive, ref, tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_autograd_grad_per_output(backend: str) -> None:
    h, w, b, labels, _ = _data(N, D, V, seed=3, masked=0.0)
    params = _fp32_leaves(h, w, b)
    out = _tiled_head(params, labels, backend, **TRANSFORMS["scaled"]).logprobs
    for i in (0, 7, N - 1):  # one token tile each side of the tile border
        got = torch.autograd.grad(out[i], params, retain_graph=True)
        onehot = torch.zeros(N)
        onehot[i] = 1.0
        ref, naive = _oracles(h, w, b, labels, onehot, TRANSFORMS["scaled"])
        _assert_within_naive(list(got), naive, ref, tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_retain_graph_under_offloading_hooks_and_zero3_gather(backend: str) -> None:
    h, w, _, labels, gout = _data(N, D, V, seed=21)
    ref, naive = _oracles(h, w, None, labels, gout, {})
    # saved-tensor hooks that offload (pack a copy, unpack a fresh copy): the kept tiles go through them too
    packed: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.numel())
        return t.detach().clone()

    hh, ww = _fp32_leaves(h, w)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t.clone()):
        out = linear_token_logprobs(hh, ww, labels, **TILES, backend=backend).logprobs
    assert packed.count(8 * 16) >= 1  # full kept tiles were packed
    for _ in range(2):
        (out * gout).sum().backward(retain_graph=True)
    _assert_within_naive([hh.grad / 2, ww.grad / 2], naive[:2], ref[:2], tol=2e-5)
    # ZeRO-3 style partitioned weight: gathered around the forward and around each backward
    param = torch.nn.Parameter(w.clone())
    full, entered = param.data, []

    @contextlib.contextmanager
    def gather() -> Iterator[None]:
        entered.append(1)
        param.data = full
        try:
            yield
        finally:
            param.data = torch.empty(0)

    param.data = torch.empty(0)
    hh = _leaf(h, torch.float32)
    out = linear_token_logprobs(hh, param, labels, **TILES, backend=backend, gather_context=gather).logprobs
    grads = [torch.autograd.grad((out * gout).sum(), [hh, param], retain_graph=True) for _ in range(2)]
    assert len(entered) == 3 and param.numel() == 0
    for got in grads:
        _assert_within_naive(list(got), naive[:2], ref[:2], tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_second_backward_without_retain_graph_names_it(backend: str) -> None:
    h, w, b, labels, gout = _data(N, D, V, seed=22)
    hh = _leaf(h, torch.float32)
    loss = (linear_token_logprobs(hh, w, labels, bias=b, **TILES, backend=backend).logprobs * gout).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_double_backward_is_refused(backend: str) -> None:
    h, w, b, labels, gout = _data(N, D, V, seed=4)
    hh = _leaf(h, torch.float32)
    out = linear_token_logprobs(hh, w, labels, bias=b, **TILES, backend=backend).logprobs
    with pytest.raises(RuntimeError, match="double backward.*create_graph=True"):
        torch.autograd.grad((out * gout).sum(), hh, create_graph=True)


def _gif_case(seed: int):
    h, w, b, labels, _ = _data(N, D, V, seed=seed)
    seg = torch.arange(N) % 4
    ref = torch.randn(4, generator=torch.Generator().manual_seed(seed + 100))

    def loss_fn(seq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        c, r = seq[0] - ref[ids[0]], seq[1] - ref[ids[1]]
        return -torch.nn.functional.logsigmoid(0.3 * (c - r))

    groups = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    return h, w, b, labels, seg, loss_fn, groups


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_retain_graph_twice(backend: str) -> None:
    h, w, b, labels, seg, loss_fn, groups = _gif_case(5)
    params = _fp32_leaves(h, w, b)
    loss, _ = linear_logprobs_loss_grad_in_forward(
        params[0], params[1], labels, seg, 4, loss_fn, bias=params[2], groups=groups, backend=backend
    )
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    loss.backward()
    for p, g1 in zip(params, first):
        torch.testing.assert_close(p.grad, 2 * g1, rtol=1e-6, atol=1e-7)
    # the first backward's gradients are right: against plain autograd over explicit float64 logits
    p64 = [_leaf(t, torch.float64) for t in (h, w, b)]
    lp, _, _ = explicit_logprobs(p64[0], p64[1], p64[2], labels)
    seq = torch.zeros(4, dtype=torch.float64).index_add(0, seg, lp)
    loss64 = sum(loss_fn(seq[g], g) for g in groups)
    for g1, g64 in zip(first, torch.autograd.grad(loss64, p64)):
        torch.testing.assert_close(g1.double(), g64, rtol=1e-4, atol=1e-5)
    # torch.autograd.grad per parameter, then once more through the same graph
    loss2, _ = linear_logprobs_loss_grad_in_forward(
        params[0], params[1], labels, seg, 4, loss_fn, bias=params[2], groups=groups, backend=backend
    )
    for p, g1 in zip(params, first):
        (got,) = torch.autograd.grad(loss2, p, retain_graph=True)
        torch.testing.assert_close(got, g1, rtol=0, atol=0)


def test_grad_in_forward_second_backward_without_retain_graph_names_it() -> None:
    h, w, _, labels, seg, loss_fn, groups = _gif_case(6)
    hh = _leaf(h, torch.float32)
    loss, _ = linear_logprobs_loss_grad_in_forward(hh, w, labels, seg, 4, loss_fn, groups=groups)
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_double_backward_is_refused(backend: str) -> None:
    h, w, _, labels, seg, loss_fn, groups = _gif_case(7)
    hh = _leaf(h, torch.float32)
    loss, _ = linear_logprobs_loss_grad_in_forward(hh, w, labels, seg, 4, loss_fn, groups=groups, backend=backend)
    with pytest.raises(RuntimeError, match="double backward.*create_graph=True"):
        torch.autograd.grad(loss, hh, create_graph=True)


def _logits_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, 6, generator=gen)
    w = torch.randn(37, 6, generator=gen)
    labels = torch.randint(0, 37, (2, 5), generator=gen)
    labels[1, :2] = -100
    return h, w, labels, torch.randn(2, generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_retain_graph_twice(backend: str) -> None:
    h, w, labels, gout = _logits_case(8)
    hh = h.clone().requires_grad_(True)
    out = sequence_logprobs(hh @ w.T, labels, backend=backend)
    (out * gout).sum().backward(retain_graph=True)
    first = hh.grad.clone()
    (out * gout).sum().backward()
    torch.testing.assert_close(hh.grad, 2 * first, rtol=1e-6, atol=1e-7)
    h64 = h.double().requires_grad_(True)
    lp, _, _ = explicit_logprobs(h64, w.double(), None, labels)
    (g64,) = torch.autograd.grad((lp.sum(-1) * gout.double()).sum(), h64)
    torch.testing.assert_close(first.double(), g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_inplace_backward_second_backward_names_the_cause(backend: str) -> None:
    h, w, labels, gout = _logits_case(9)
    hh = h.clone().requires_grad_(True)
    out = sequence_logprobs(hh @ w.T, labels, inplace_backward=True, backend=backend)
    (out * gout).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=False.*retain_graph=True"):
        (out * gout).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_double_backward_is_refused(backend: str) -> None:
    h, w, labels, gout = _logits_case(10)
    hh = h.clone().requires_grad_(True)
    out = sequence_logprobs(hh @ w.T, labels, backend=backend)
    with pytest.raises(RuntimeError, match="double backward.*create_graph=True"):
        torch.autograd.grad((out * gout).sum(), hh, create_graph=True)


def test_segment_sum_backward_twice_and_double_backward() -> None:
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1, 0, 2, 4, 4, 0])
    out = segment_sum(values, ids, 5)
    gout = torch.randn(5, dtype=torch.float64, generator=gen)
    (out * gout).sum().backward(retain_graph=True)
    (out * gout).sum().backward()
    torch.testing.assert_close(values.grad, 2 * gout[ids])
    # the backward is a gather, so second-order gradients exist and are right
    fresh = values.detach().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda v: segment_sum(v, ids, 5, backend="torch"), (fresh,))


# ---------------------------------------------------------------------------------------------------------------
# item 2: a whole vocabulary tile of -inf logits (masked through the bias)
# ---------------------------------------------------------------------------------------------------------------

# V = 70 in tiles of 16: [0, 16) [16, 32) [32, 48) [48, 64) [64, 70)
MASKS = {"first": (0, 16), "middle": (32, 48), "last_partial": (64, 70), "all_but_label": None}


def _masked_case(mask: str, seed: int):
    vocab = 70
    h, w, b, _, gout = _data(N, D, vocab, seed=seed)
    masked = torch.zeros(vocab, dtype=torch.bool)
    if MASKS[mask] is None:
        masked[:] = True
        masked[16:32] = False
    else:
        masked[slice(*MASKS[mask])] = True
    b = torch.where(masked, float("-inf"), b)
    allowed = (~masked).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = allowed[torch.randint(0, allowed.numel(), (N,), generator=gen)]
    labels[3] = -100
    return h, w, b, labels, gout, masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("transform", ["plain", "scaled"])
@pytest.mark.parametrize("stats", [False, True], ids=["lse_only", "stats"])
def test_head_masked_vocabulary_tile(backend: str, mask: str, transform: str, stats: bool) -> None:
    h, w, b, labels, gout, masked = _masked_case(mask, seed=12)
    _check_masked(h, w, b, labels, gout, masked, TRANSFORMS[transform], backend, stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_masked_vocabulary_tile_softcap(backend: str) -> None:
    h, w, b, labels, gout, masked = _masked_case("first", seed=13)
    _check_masked(h, w, b, labels, gout, masked, TRANSFORMS["softcap"], backend, True)


def _check_masked(h, w, b, labels, gout, masked, transform, backend, stats) -> None:
    params = _fp32_leaves(h, w, b)
    out = _tiled_head(params, labels, backend, **transform, **(STAT_FLAGS if stats else {}))
    p64 = [_leaf(t, torch.float64) for t in (h, w, b)]
    lp64, z64, logsm64 = explicit_logprobs(p64[0], p64[1], p64[2], labels, **transform)
    lp32, _, _ = explicit_logprobs(*_fp32_leaves(h, w, b), labels, **transform)
    assert torch.isfinite(lp64).all()  # the oracle: masked vocabulary, finite log-probs
    assert torch.isfinite(out.logprobs).all(), out.logprobs
    assert _err(out.logprobs, lp64) <= _err(lp32, lp64) + 2e-5 * max(1.0, lp64.abs().max().item())
    if stats:
        valid = labels != -100
        with torch.no_grad():
            p = logsm64.exp()
            entropy = -torch.where(logsm64 == float("-inf"), 0.0, p * logsm64).sum(-1)
            expected = {
                "entropy": entropy,
                "log_sum_p2": torch.logsumexp(2 * logsm64, dim=-1),
                "mean_logit": z64.mean(-1),  # -inf whenever a logit is -inf, as the naive mean
            }
        for name, ref in expected.items():
            got = getattr(out, name)
            torch.testing.assert_close(got[valid].double(), ref[valid], rtol=1e-5, atol=1e-5, msg=name)
            assert torch.all(got[~valid] == 0), name
        assert torch.equal(out.argmax_hit, (z64.argmax(-1) == labels) & valid)
    (out.logprobs * gout).sum().backward()
    grads = [p.grad for p in params]
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[1][masked] == 0) and torch.all(grads[2][masked] == 0)  # exactly zero, never NaN
    ref = list(torch.autograd.grad((lp64 * gout.double()).sum(), p64))
    _, naive = _oracle_grads(h, w, b, labels, gout, transform, torch.float32)
    _assert_within_naive(grads, naive, ref, tol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# item 5: gradient precision at very large logits, |g| != 1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.5, "temperature": 2.0}], ids=["plain", "scaled"])
@pytest.mark.parametrize("keep", ["default", "none"])
def test_head_gradient_precision_at_large_logits(backend: str, transform: dict, keep: str) -> None:
    # Integer hidden states and weights (and power-of-two scales): every logit (|z| ~ 1e4) is exact in fp32, so the
    # only error left is the head's own; pairs of vocabulary rows one unit vector apart give near-ties at the top.
    gen = torch.Generator().manual_seed(14)
    n, d, v = 29, 16, 203
    h = torch.randint(-3, 4, (n, d), generator=gen).float()
    w = torch.randint(-5000, 5001, (v, d), generator=gen).float()
    w[1::2] = w[0:-1:2] + torch.eye(d)[torch.arange(v // 2) % d]
    b = torch.randint(-50, 51, (v,), generator=gen).float()
    b[1::2] = b[0:-1:2]
    labels = torch.randint(0, v, (n,), generator=gen)
    gout = (torch.rand(n, generator=gen) * 3.0 + 0.1) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    z = explicit_logits(h.double(), w.double(), b.double(), **transform)
    assert z.abs().max() > 1e4 and (z.float().double() == z).all()
    top2 = z.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]) < 4).sum() >= 3  # near-ties at the top in several rows
    params = _fp32_leaves(h, w, b)
    tiles = {"token_tile": 16, "vocab_tile": 64}
    out = _tiled_head(params, labels, backend, tiles=tiles, keep_logits_bytes=KEEP[keep], **transform).logprobs
    (out * gout).sum().backward()
    lp64, ref = _oracle_grads(h, w, b, labels, gout, transform, torch.float64)
    lp32, naive = _oracle_grads(h, w, b, labels, gout, transform, torch.float32)
    assert _err(out, lp64) <= _err(lp32, lp64) + 1e-6 * max(1.0, lp64.abs().max().item())
    # relative tolerance 1e-6 of the largest gradient: naive's own error is ~1e-7 relative here
    _assert_within_naive([p.grad for p in params], naive, ref, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_precision_with_a_few_large_logit_rows(backend: str) -> None:
    # most rows have small logits (the fold's column-0 estimate of a tile's lse), a few have |z| ~ 1e4 with
    # near-ties (the exact form for those rows only): both must stay at naive's level
    gen = torch.Generator().manual_seed(23)
    n, d, v = 40, 16, 203
    h = torch.randint(-3, 4, (n, d), generator=gen).float()
    w = torch.randint(-5000, 5001, (v, d), generator=gen).float()
    w[1::2] = w[0:-1:2] + torch.eye(d)[torch.arange(v // 2) % d]
    h[[i for i in range(n) if i % 7]] /= 4096.0  # exact power-of-two scaling: small logits in 34 of 40 rows
    labels = torch.randint(0, v, (n,), generator=gen)
    gout = torch.rand(n, generator=gen) + 0.5
    params = _fp32_leaves(h, w)
    out = linear_token_logprobs(params[0], params[1], labels, token_tile=64, vocab_tile=64, backend=backend).logprobs
    (out * gout).sum().backward()
    lp64, ref = _oracle_grads(h, w, None, labels, gout, {}, torch.float64)
    lp32, naive = _oracle_grads(h, w, None, labels, gout, {}, torch.float32)
    assert _err(out, lp64) <= _err(lp32, lp64) + 1e-6 * max(1.0, lp64.abs().max().item())
    for a, nv, r in zip([p.grad for p in params], naive, ref):
        scale = r.abs().max().item()
        assert _err(a, r) <= _err(nv, r) + 1e-6 * scale, (_err(a, r), _err(nv, r), scale)


# ---------------------------------------------------------------------------------------------------------------
# item 12: validate=False with labels outside the vocabulary -> NaN log-prob, zero gradient row, no crash
# ---------------------------------------------------------------------------------------------------------------

BAD_LABELS = {2: V, 5: 60, 9: -5, 11: 10**9}  # 60 lies in the padded part of the last (partial) vocabulary tile


def _bad_label_case(seed: int):
    h, w, b, labels, gout = _data(N, D, V, seed=seed, masked=0.0)
    labels[0] = -100
    bad = torch.zeros(N, dtype=torch.bool)
    for i, lab in BAD_LABELS.items():
        labels[i] = lab
        bad[i] = True
    return h, w, b, labels, gout, bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "softcap"])
def test_head_out_of_vocab_label_without_validation(backend: str, transform: str) -> None:
    h, w, b, labels, gout, bad = _bad_label_case(15)
    params = _fp32_leaves(h, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # validate=False also skips the non-finite warning
        out = _tiled_head(params, labels, backend, validate=False, **TRANSFORMS[transform]).logprobs
    assert torch.isnan(out[bad]).all() and out[0] == 0
    good = ~bad & (labels != -100)
    good_labels = torch.where(good, labels, -100)
    lp64, ref = _oracle_grads(h, w, b, good_labels, gout, TRANSFORMS[transform], torch.float64)
    torch.testing.assert_close(out[good].double(), lp64[good], rtol=1e-5, atol=1e-5)
    (torch.where(torch.isnan(out), 0.0, out) * gout).sum().backward()  # finite loss: rows of bad labels get 0
    assert torch.all(params[0].grad[bad] == 0)
    _, naive = _oracle_grads(h, w, b, good_labels, gout, TRANSFORMS[transform], torch.float32)
    _assert_within_naive([p.grad for p in params], naive, ref, tol=2e-5)
    # even an incoming gradient on the bad rows gives them a zero row
    hh = _leaf(h, torch.float32)
    out = linear_token_logprobs(hh, w, labels, bias=b, **TILES, validate=False, backend=backend).logprobs
    out.backward(gout)
    assert torch.all(hh.grad[bad] == 0) and torch.isfinite(hh.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_out_of_vocab_label_propagates_nan_to_sequences(backend: str) -> None:
    h, w, b, labels, _, bad = _bad_label_case(16)
    seg = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 6])  # bad tokens: 2 (seg 1), 5 (3), 9 (5), 11 (6)
    seq = linear_sequence_logprobs(
        h, w, labels, bias=b, segment_ids=seg, num_segments=7, **TILES, validate=False, backend=backend
    )
    assert torch.isnan(seq[[1, 3, 5, 6]]).all() and torch.isfinite(seq[[0, 2, 4]]).all()
    # grad-in-forward: the same sequence log-probs, and a zero gradient row for each bad token
    hh = _leaf(h, torch.float32)

    def loss_fn(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (s * (ids + 1).float()).sum()

    loss, seq_gif = linear_logprobs_loss_grad_in_forward(
        hh,
        w,
        labels,
        seg,
        7,
        loss_fn,
        bias=b,
        groups=[torch.tensor([k]) for k in range(7)],
        validate=False,
        backend=backend,
    )
    torch.testing.assert_close(seq_gif, seq, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.all(hh.grad[bad] == 0) and torch.isfinite(hh.grad).all()
    # the recompute path gives the same gradient for the same (linear) loss
    h2 = _leaf(h, torch.float32)
    seq2 = linear_sequence_logprobs(
        h2, w, labels, bias=b, segment_ids=seg, num_segments=7, **TILES, validate=False, backend=backend
    )
    (seq2 * torch.arange(1, 8).float()).sum().backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_from_logits_out_of_vocab_label_without_validation_torch() -> None:
    h, w, labels, _ = _logits_case(17)
    labels[0, 1], labels[1, 4] = 37, -3
    hh = h.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tok = token_logprobs(hh @ w.T, labels, validate=False, backend="torch")
    assert torch.isnan(tok[0, 1]) and torch.isnan(tok[1, 4])
    assert torch.all(tok[1, :2] == 0)
    ok = torch.isfinite(tok)
    tok.backward(torch.ones_like(tok))
    # the gradient rows of the bad tokens are 0; the others match the oracle
    assert torch.all(hh.grad[0, 1] == 0) and torch.all(hh.grad[1, 4] == 0)
    h64 = h.double().requires_grad_(True)
    good = torch.where(ok, labels, -100)
    lp, _, _ = explicit_logprobs(h64, w.double(), None, good)
    (g64,) = torch.autograd.grad(lp.sum(), h64)
    torch.testing.assert_close(hh.grad.double(), g64, rtol=1e-4, atol=1e-6)
    seq = sequence_logprobs(h @ w.T, labels, validate=False, backend="torch")
    assert torch.isnan(seq).all()


_FROM_LOGITS_SCRIPT = r"""
import json, torch
from fastdpo.logprobs import sequence_logprobs, token_logprobs
labels = torch.tensor([[0, 1, 2, 3, 4, 10**9], [5, -3, 11, 7, -100, 6]])
logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
tok = token_logprobs(logits * 1.0, labels, validate=False, backend="triton")
seq = sequence_logprobs(logits * 1.0, labels, validate=False, backend="triton")
tok.backward(torch.ones_like(tok))
rows = logits.grad[[0, 1, 1], [5, 1, 2]]
print(json.dumps({"tok": [[None if x != x else x for x in r] for r in tok.tolist()],
                  "seq_nan": [x != x for x in seq.tolist()], "bad_rows_zero": bool((rows == 0).all()),
                  "grad_finite": bool(torch.isfinite(logits.grad).all())}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_from_logits_out_of_vocab_label_without_validation_triton() -> None:
    # run in a child process: the unfixed kernel reads outside the logits and crashes the process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FROM_LOGITS_SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, f"process died with {proc.returncode}: {proc.stderr[-2000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tok"][0][5] is None and res["tok"][1][1] is None and res["tok"][1][2] is None
    assert res["tok"][1][4] == 0.0
    assert all(x is not None for x in res["tok"][0][:5])
    assert res["seq_nan"] == [True, True]
    assert res["bad_rows_zero"] and res["grad_finite"]
