"""Fused LM head (fastdpo.head): correctness against float64, memory behaviour, grad-in-forward.

Error rule: |fused - float64 reference| <= |naive same-dtype - float64 reference| + tol (naive = materialized logits
in the input dtype). Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny
shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from backends import BACKENDS
from helpers import STAT_FLAGS

from fastdpo.head import (
    TokenStats,
    linear_logprobs_loss_grad_in_forward,
    linear_sequence_logprobs,
    linear_token_logprobs,
)
from fastdpo.reference import naive_linear_token_logprobs

# tiny shapes: one intra-op thread avoids per-op synchronisation on the shared 2-core runner
pytestmark = pytest.mark.usefixtures("one_thread")


TRANSFORMS = [{}, {"softcap": 4.0, "logit_scale": 1.7, "temperature": 0.8}, {"logit_scale": 0.6, "temperature": 1.3}]


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, masked: float, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) * 0.7).to(dtype).requires_grad_(True)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    if masked > 0:
        k = round(masked * n)
        labels[torch.randperm(n, generator=gen)[:k]] = -100
    gout = torch.randn(n, generator=gen)
    return hidden, weight, b, labels, gout


def _grads(out: torch.Tensor, gout: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad((out.double() * gout.double()).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _check_against_reference(dtype, transform, masked, backend, chunk, shape, seed, keep=None):
    n, d, v = shape
    tiles = {} if chunk is None else {"token_tile": chunk[0], "vocab_tile": chunk[1]}
    hidden, weight, bias, labels, gout = _inputs(n, d, v, dtype, masked, seed)
    params = [hidden, weight, bias]
    fused = linear_token_logprobs(
        hidden, weight, labels, bias=bias, **tiles, backend=backend, keep_logits_bytes=keep, **transform, **STAT_FLAGS
    )
    naive = naive_linear_token_logprobs(hidden, weight, labels, bias=bias, **transform, **STAT_FLAGS)
    p64 = [_f64(p) for p in params]
    ref = naive_linear_token_logprobs(p64[0], p64[1], labels, bias=p64[2], **transform, **STAT_FLAGS)
    assert fused.logprobs.dtype == torch.float32 and fused.logprobs.shape == labels.shape
    tol = 2e-5 if dtype == torch.float32 else 2e-3

    def err(a: torch.Tensor, r: torch.Tensor) -> float:
        return (a.double() - r.double()).abs().max().item() if a.numel() else 0.0

    e_f, e_n = err(fused.logprobs, ref.logprobs), err(naive.logprobs, ref.logprobs)
    assert e_f <= e_n + tol * max(1.0, ref.logprobs.abs().max().item()), (e_f, e_n)
    ignored = labels == -100
    assert torch.all(fused.logprobs[ignored] == 0)
    for name in ("entropy", "log_sum_p2", "mean_logit"):
        a, r, nv = getattr(fused, name), getattr(ref, name), getattr(naive, name)
        assert a.dtype == torch.float32 and a.shape == labels.shape
        assert err(a, r) <= err(nv, r) + tol * max(1.0, r.abs().max().item()), name
        assert torch.all(a[ignored] == 0)
    assert fused.argmax_hit.dtype == torch.bool
    assert torch.equal(fused.argmax_hit, ref.argmax_hit)  # random inputs: no near-ties
    g_n = _grads(naive.logprobs, gout, params)
    g_r = _grads(ref.logprobs, gout, p64)
    # log-probs only (the lean fold) must agree as well
    plain = linear_token_logprobs(
        hidden, weight, labels, bias=bias, **tiles, backend=backend, keep_logits_bytes=keep, **transform
    )
    e_p = err(plain.logprobs, ref.logprobs)
    assert e_p <= e_n + tol * max(1.0, ref.logprobs.abs().max().item()), (e_p, e_n)
    for out in (fused, plain):
        g_f = _grads(out.logprobs, gout, params)
        for name, a, nv, r in zip(("hidden", "weight", "bias"), g_f, g_n, g_r):
            assert a.dtype == dtype and a.shape == r.shape, name
            scale = max(1.0, r.abs().max().item())
            assert err(a, r) <= err(nv, r) + tol * scale, (name, err(a, r), err(nv, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("masked", [0.0, 0.25])
def test_torch_path_matches_float64(dtype, transform, masked):
    # odd shapes, several token and vocabulary tiles, a partial last tile each way, some logits kept
    _check_against_reference(dtype, transform, masked, "torch", (16, 40), (67, 29, 203), seed=1, keep=16 * 40 * 4 * 2)


def test_torch_path_default_tiling_and_single_tile():
    _check_against_reference(torch.float32, TRANSFORMS[1], 0.25, "torch", None, (33, 17, 151), seed=2)
    _check_against_reference(torch.float32, {}, 0.0, "torch", (1000, 1000), (5, 7, 11), seed=3, keep=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", TRANSFORMS[:2])
def test_triton_kernels_interpreter(dtype, transform):
    # tiny: the interpreter is slow. Two token tiles x three vocabulary tiles (last one partial).
    _check_against_reference(dtype, transform, 0.25, "triton", (6, 16), (11, 8, 37), seed=4, keep=6 * 16 * 4)


def test_all_rows_masked_gives_zero_and_zero_grads():
    hidden, weight, bias, labels, gout = _inputs(9, 7, 23, torch.float32, 0.0, seed=5)
    labels = torch.full_like(labels, -100)
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, **STAT_FLAGS)
    assert torch.all(out.logprobs == 0) and not out.argmax_hit.any()
    for g in _grads(out.logprobs, gout, [hidden, weight, bias]):
        assert torch.all(g == 0)
    seq = linear_sequence_logprobs(hidden.reshape(3, 3, 7), weight, labels.reshape(3, 3), bias=bias)
    assert torch.all(seq == 0) and seq.shape == (3,)


def test_argmax_ties_first_maximum_wins():
    d, v = 6, 10
    gen = torch.Generator().manual_seed(17)
    weight = torch.randn(v, d, generator=gen) * 0.1
    u = torch.randn(d, generator=gen)
    weight[3] = weight[7] = 3.0 * u  # identical rows: identical logits, and the clear maximum of every row
    hidden = u + 0.1 * torch.randn(4, d, generator=gen)
    labels = torch.tensor([3, 7, 3, 7])
    for backend, chunk in (("torch", 4), ("torch", None), ("triton", 4)):
        out = linear_token_logprobs(hidden, weight, labels, return_argmax_hit=True, vocab_tile=chunk, backend=backend)
        assert out.argmax_hit.tolist() == [True, False, True, False], backend


def test_sequence_logprobs_layouts_and_average():
    b, t, d, v = 3, 7, 13, 41
    hidden, weight, bias, labels, _ = _inputs(b * t, d, v, torch.float64, 0.3, seed=6)
    labels = labels.reshape(b, t)
    labels[1] = -100  # a row with no completion token
    h3 = hidden.reshape(b, t, d)
    ref_tok = naive_linear_token_logprobs(h3, weight, labels, bias=bias).logprobs
    for average in (False, True):
        out = linear_sequence_logprobs(h3, weight, labels, bias=bias, average=average, token_tile=4, vocab_tile=8)
        expect = ref_tok.sum(1)
        if average:
            expect = expect / (labels != -100).sum(1).clamp(min=1)
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
        assert out[1] == 0
    # packed layout with segment ids (ids at ignored positions are not looked at)
    flat = labels.reshape(-1)
    seg = torch.arange(b * t) // 5
    seg[flat == -100] = 99
    out = linear_sequence_logprobs(hidden, weight, flat, bias=bias, segment_ids=seg, num_segments=6)
    tok = ref_tok.reshape(-1)
    expect = torch.zeros(6, dtype=torch.float64)
    for s in range(6):
        expect[s] = tok[(seg == s) & (flat != -100)].sum()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)
    g = torch.autograd.grad(out.sum(), hidden)[0]
    assert torch.all(g.reshape(b, t, d)[1] == 0)


def test_tied_embeddings_accumulate():
    torch.manual_seed(7)
    v, d = 31, 12
    emb = torch.nn.Embedding(v, d)
    ids = torch.randint(0, v, (2, 9))
    labels = torch.randint(0, v, (2, 9))
    labels[0, :3] = -100
    grads = []
    for fn in (linear_token_logprobs, naive_linear_token_logprobs):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids)) * 2.0
        out = fn(hidden, emb.weight, labels, softcap=3.0).logprobs
        out.sum().backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


class _Counter:
    """Bytes of tensors packed for backward that are not views of the given inputs."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        self.count = 0
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if t.untyped_storage().data_ptr() not in self.ptrs:
            self.bytes += t.numel() * t.element_size()
        return t

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


@pytest.mark.parametrize("keep", [0, 4096])
def test_saved_bytes_do_not_grow_with_vocab(keep):
    saved = []
    for v in (300, 3000):
        hidden, weight, _, labels, _ = _inputs(40, 16, v, torch.float32, 0.0, seed=8, bias=False)
        counter = _Counter([hidden, weight, labels])
        with counter():
            out = linear_token_logprobs(
                hidden, weight, labels, token_tile=16, vocab_tile=64, keep_logits_bytes=keep
            ).logprobs
        out.sum().backward()
        assert counter.count > 0
        saved.append(counter.bytes)
    assert saved[0] == saved[1]
    assert saved[0] <= 40 * 8 * 4 + keep  # O(N) state (lse, labels, ...) plus the kept-logits budget


def test_no_grad_saves_nothing():
    hidden, weight, bias, labels, _ = _inputs(21, 9, 55, torch.float32, 0.25, seed=9)
    for mode in (torch.no_grad, torch.inference_mode):
        counter = _Counter([])
        with counter(), mode():
            out = linear_token_logprobs(hidden, weight, labels, bias=bias, **STAT_FLAGS)
        assert counter.count == 0 and out.logprobs.grad_fn is None
    counter = _Counter([])
    with counter():
        out = linear_token_logprobs(hidden.detach(), weight.detach(), labels, bias=bias.detach())
    assert counter.count == 0 and out.logprobs.grad_fn is None
    ref = naive_linear_token_logprobs(hidden, weight, labels, bias=bias).logprobs
    torch.testing.assert_close(out.logprobs, ref.detach(), rtol=1e-5, atol=1e-5)


def test_only_weight_or_only_hidden_requires_grad():
    hidden, weight, _, labels, gout = _inputs(15, 8, 33, torch.float32, 0.25, seed=10, bias=False)
    ref = _grads(naive_linear_token_logprobs(hidden, weight, labels).logprobs, gout, [hidden, weight])
    h2 = hidden.detach()
    (gw,) = _grads(linear_token_logprobs(h2, weight, labels, vocab_tile=8).logprobs, gout, [weight])
    torch.testing.assert_close(gw, ref[1], rtol=1e-5, atol=1e-5)
    w2 = weight.detach()
    (gh,) = _grads(linear_token_logprobs(hidden, w2, labels, vocab_tile=8).logprobs, gout, [hidden])
    torch.testing.assert_close(gh, ref[0], rtol=1e-5, atol=1e-5)


def test_bit_identical_reruns():
    hidden, weight, bias, labels, gout = _inputs(37, 11, 90, torch.float32, 0.25, seed=11)
    runs = []
    for _ in range(2):
        out = linear_token_logprobs(
            hidden, weight, labels, bias=bias, softcap=5.0, token_tile=8, vocab_tile=16
        ).logprobs
        runs.append([out.detach()] + _grads(out, gout, [hidden, weight, bias]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class _PartitionedParam:
    """ZeRO-3 style test double: outside the context the parameter holds an empty placeholder."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param = param
        self.full = param.data
        param.data = torch.empty(0, dtype=param.dtype)
        self.entered = 0

    @contextlib.contextmanager
    def gather(self) -> Iterator[None]:
        self.entered += 1
        self.param.data = self.full
        try:
            yield
        finally:
            self.param.data = torch.empty(0, dtype=self.param.dtype)


def test_gather_context_zero3_style():
    hidden, weight, _, labels, gout = _inputs(19, 10, 47, torch.float32, 0.25, seed=12, bias=False)
    ref = _grads(naive_linear_token_logprobs(hidden, weight, labels).logprobs, gout, [hidden, weight])
    param = torch.nn.Parameter(weight.detach().clone())
    part = _PartitionedParam(param)
    out = linear_token_logprobs(hidden, param, labels, gather_context=part.gather, token_tile=8, vocab_tile=16).logprobs
    assert part.entered == 1 and param.numel() == 0
    gh, gw = torch.autograd.grad((out * gout).sum(), [hidden, param])
    assert part.entered == 2
    torch.testing.assert_close(gh, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref[1], rtol=1e-5, atol=1e-5)


def _pair_setup(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    m, d, v, pairs = 61, 14, 83, 5
    s = 2 * pairs
    hidden = torch.randn(m, d, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) * 0.6).to(dtype).requires_grad_(True)
    bias = (torch.randn(v, generator=gen) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (m,), generator=gen)
    labels[::4] = -100
    seg = torch.randint(0, s, (m,), generator=gen)
    seg[seg == 3] = 4  # segment 3 (chosen of pair 3) has no token at all
    ref_logps = torch.randn(s, generator=gen) * 3
    return hidden, weight, bias, labels, seg, s, pairs, ref_logps


def _grad_in_forward(case: tuple, loss_fn: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_logprobs_loss_grad_in_forward`` over a :func:`_pair_setup` case (its bias included) with ``kw``."""
    hidden, weight, bias, labels, seg, s, _, _ = case
    return linear_logprobs_loss_grad_in_forward(hidden, weight, labels, seg, s, loss_fn, bias=bias, **kw)


@pytest.mark.parametrize("transform", TRANSFORMS[:2])
@pytest.mark.parametrize("chunk_tokens", [None, 12])
def test_grad_in_forward_matches_recompute(transform, chunk_tokens):
    case = _pair_setup(13)
    hidden, weight, bias, labels, seg, s, pairs, ref_logps = case
    beta = 0.3

    def loss_fn(seq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        margin = (seq[0] - ref_logps[ids[0]]) - (seq[1] - ref_logps[ids[1]])
        return -torch.nn.functional.logsigmoid(beta * margin) / pairs

    groups = [torch.tensor([i, pairs + i]) for i in range(pairs - 1)]  # last pair in no group: no loss
    loss, seq = _grad_in_forward(
        case,
        loss_fn,
        groups=groups,
        chunk_tokens=chunk_tokens,
        keep_logits_bytes=None if chunk_tokens is None else 12 * 83 * 4 // 2,  # partially kept chunk logits
        **transform,
    )
    assert seq.grad_fn is None and seq.dtype == torch.float32
    seq_r = linear_sequence_logprobs(hidden, weight, labels, bias=bias, segment_ids=seg, num_segments=s, **transform)
    loss_r = sum(loss_fn(seq_r[g], g) for g in groups)
    torch.testing.assert_close(seq, seq_r.detach(), rtol=1e-5, atol=1e-5)
    assert seq[3] == 0
    torch.testing.assert_close(loss.detach(), loss_r.detach(), rtol=1e-5, atol=1e-6)
    g_a = torch.autograd.grad(loss * 1.7, [hidden, weight, bias])
    g_b = torch.autograd.grad(loss_r * 1.7, [hidden, weight, bias])
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grad_in_forward_triton_interpreter():
    case = _pair_setup(14)
    hidden, weight, bias, labels, seg, s, pairs, ref_logps = case

    def loss_fn(seq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (seq - ref_logps[ids]).pow(2).sum()

    groups = [torch.tensor([i, pairs + i]) for i in range(pairs)]
    loss, _ = _grad_in_forward(case, loss_fn, groups=groups, chunk_tokens=30, backend="triton", softcap=6.0)
    seq_r = linear_sequence_logprobs(hidden, weight, labels, bias=bias, segment_ids=seg, num_segments=s, softcap=6.0)
    loss_r = sum(loss_fn(seq_r[g], g) for g in groups)
    torch.testing.assert_close(loss.detach(), loss_r.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(loss_r, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_token_weights_and_segment_stats(backend):
    """LD-style token weights and a loss that reads the plain NLL sums (differentiable) and WPO-style weights from
    ``log sum p^2`` (detached): loss and gradients equal autograd through the recompute path."""
    from fastdpo.head import SegmentStats
    from fastdpo.segments import segment_sum

    case = _pair_setup(16)
    hidden, weight, bias, labels, seg, s, pairs, ref_logps = case
    gen = torch.Generator().manual_seed(17)
    tw = torch.where(torch.rand(labels.shape, generator=gen) < 0.5, 1.0, 0.35)

    def loss_fn(seq: torch.Tensor, ids: torch.Tensor, st: SegmentStats) -> torch.Tensor:
        assert not st.log_sum_p2_sum.requires_grad and st.logp_sum.requires_grad
        wpo = torch.exp((st.logp_sum.detach() - st.log_sum_p2_sum) / 7.0).prod()
        margin = (seq[0] - ref_logps[ids[0]]) - (seq[1] - ref_logps[ids[1]])
        return (-wpo * torch.nn.functional.logsigmoid(0.4 * margin) - 0.05 * st.logp_sum[0]) / pairs

    groups = [torch.tensor([i, pairs + i]) for i in range(pairs)]
    loss, seq = _grad_in_forward(
        case,
        loss_fn,
        groups=groups,
        token_weights=tw,
        segment_stats=True,
        segment_log_sum_p2=True,
        chunk_tokens=20,
        backend=backend,
    )

    def reference(nll_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_logps, loss) by autograd through the recompute path; ``nll_coef`` weighs the plain-sum term."""
        stats = linear_token_logprobs(hidden, weight, labels, bias=bias, return_log_sum_p2=True)
        valid = labels != -100
        lp = torch.where(valid, stats.logprobs, 0.0)
        seq_r, plain = segment_sum(lp * tw, seg, s), segment_sum(lp, seg, s)
        lsp2 = segment_sum(torch.where(valid, stats.log_sum_p2, 0.0), seg, s).detach()
        loss_r = sum(loss_fn(seq_r[g], g, SegmentStats(plain[g], lsp2[g])) for g in groups)
        return seq_r, loss_r + (0.05 - nll_coef) * plain[groups[0][0]] / pairs

    seq_r, loss_r = reference(0.05)
    torch.testing.assert_close(seq, seq_r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), loss_r.detach(), rtol=1e-5, atol=1e-6)
    g_a = torch.autograd.grad(loss, [hidden, weight, bias])
    g_b = torch.autograd.grad(loss_r, [hidden, weight, bias])
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the plain-sum term really carries gradient: without it pair 0's chosen tokens get another hidden-state gradient
    g_c = torch.autograd.grad(reference(0.0)[1], hidden)[0]
    assert float((g_a[0] - g_c).abs().max()) > 1e-4


def test_grad_in_forward_no_grad_is_loss_only():
    with torch.no_grad():
        loss, seq = _grad_in_forward(_pair_setup(15), lambda x, ids: x.sum())
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, seq.sum(), rtol=1e-5, atol=1e-5)


def test_dtensor_weight_is_gathered_and_grad_redistributed(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, _, labels, gout = _inputs(13, 8, 29, torch.float32, 0.25, seed=16, bias=False)
    ref = _grads(naive_linear_token_logprobs(hidden, weight, labels).logprobs, gout, [hidden, weight])
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dw = distribute_tensor(weight.detach().clone(), mesh, [Shard(0)]).requires_grad_(True)
        out = linear_token_logprobs(hidden, dw, labels, vocab_tile=8).logprobs
        gh, gw = torch.autograd.grad((out * gout).sum(), [hidden, dw])
        assert type(gw).__name__ == "DTensor" and gw.placements == dw.placements
        torch.testing.assert_close(gw.full_tensor(), ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh, ref[0], rtol=1e-5, atol=1e-5)
    finally:
        if started:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"labels": torch.tensor([0, 99, 1])}, ValueError, "labels"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "labels"),
        ({"labels": torch.tensor([0, 1])}, ValueError, "labels"),
        ({"weight": torch.randn(10, 5)}, ValueError, "hidden"),
        ({"bias": torch.randn(9)}, ValueError, "bias"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"logit_scale": float("nan")}, ValueError, "logit_scale"),
        ({"hidden": torch.randint(0, 3, (3, 4))}, TypeError, "hidden"),
        ({"vocab_tile": 0}, ValueError, "vocab_tile"),
        ({"token_tile": 2.5}, TypeError, "token_tile"),
        ({"keep_logits_bytes": -1}, ValueError, "keep_logits_bytes"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_input_raises(kwargs: dict[str, Any], exc: type, match: str):
    args: dict[str, Any] = {
        "hidden": torch.randn(3, 4),
        "weight": torch.randn(10, 4),
        "labels": torch.tensor([0, 1, 2]),
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_token_stats_fields():
    assert TokenStats._fields == ("logprobs", "entropy", "log_sum_p2", "mean_logit", "argmax_hit")
    out = linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(9, 4), torch.randint(0, 9, (2, 3)))
    assert out.logprobs.shape == (2, 3) and out.entropy is None and out.argmax_hit is None
    assert torch.all(out.logprobs <= 0)


def test_wide_logit_range_keeps_naive_accuracy():
    # logits spanning hundreds of nats: the lean fold's exact fallback must keep the error at the naive level
    gen = torch.Generator().manual_seed(18)
    hidden = torch.randn(23, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(53, 8, generator=gen, dtype=torch.float64) * 30
    labels = torch.randint(0, 53, (23,), generator=gen)
    ref = naive_linear_token_logprobs(hidden, weight, labels).logprobs
    naive = naive_linear_token_logprobs(hidden.float(), weight.float(), labels).logprobs
    fused = linear_token_logprobs(hidden.float(), weight.float(), labels, vocab_tile=16).logprobs
    e_n = (naive.double() - ref).abs().max().item()
    assert (fused.double() - ref).abs().max().item() <= e_n + 1e-6 * ref.abs().max().item()
