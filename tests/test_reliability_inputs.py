"""Bad inputs to the library ops get a clear Python exception before any kernel launch (issue 13 item 11):
meta tensors, float64 with ``backend="triton"``, ``num_segments`` without ``segment_ids``, stray huge segment ids,
and ``grad_in_forward`` under ``torch.inference_mode`` (which must compute the loss, without gradients).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastdpo import linear_sequence_logprobs, linear_token_logprobs, preference_loss, sequence_logprobs, token_logprobs
from fastdpo.head import linear_logprobs_loss_grad_in_forward
from fastdpo.losses import cpo_loss, kto_loss, ld_logps, ld_token_weights, orpo_loss, simpo_loss, wpo_weights
from fastdpo.nn import DPOLoss, FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss
from fastdpo.reference import naive_linear_token_logprobs, naive_sequence_logprobs
from fastdpo.segments import segment_sum

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _meta_cases() -> dict[str, Callable[[], Any]]:
    m = torch.device("meta")

    def f(*s: int) -> torch.Tensor:
        return torch.randn(*s, device=m)

    def i(hi: int, *s: int) -> torch.Tensor:
        return torch.randint(0, hi, s, device=m)

    h, w, lab, seg = f(6, 4), f(11, 4), i(11, 6), i(2, 6)
    x3, t2 = f(4, 3, 4), i(11, 4, 3)
    p = [f(3) for _ in range(4)]
    lens = i(5, 3) + 1
    return {
        "token_logprobs": lambda: token_logprobs(f(2, 3, 5), i(5, 2, 3), validate=False),
        "sequence_logprobs": lambda: sequence_logprobs(f(2, 3, 5), i(5, 2, 3)),
        "sequence_logprobs_packed": lambda: sequence_logprobs(
            f(6, 5), i(5, 6), segment_ids=seg, num_segments=2, validate=False
        ),
        "naive_sequence_logprobs": lambda: naive_sequence_logprobs(f(2, 3, 5), i(5, 2, 3)),
        "segment_sum": lambda: segment_sum(f(6), seg, 2, validate=False),
        "linear_token_logprobs": lambda: linear_token_logprobs(h, w, lab, validate=False),
        "linear_sequence_logprobs": lambda: linear_sequence_logprobs(h, w, lab, segment_ids=seg, num_segments=2),
        "naive_linear_token_logprobs": lambda: naive_linear_token_logprobs(h, w, lab, validate=False),
        "grad_in_forward": lambda: linear_logprobs_loss_grad_in_forward(
            h, w, lab, seg, 2, lambda s, g: s.sum(), validate=False
        ),
        "preference_loss": lambda: preference_loss(*p),
        "simpo_loss": lambda: simpo_loss(p[0], p[1], lens, lens),
        "cpo_loss": lambda: cpo_loss(p[0], p[1], lens),
        "orpo_loss": lambda: orpo_loss(p[0], p[1], lens, lens),
        "kto_loss": lambda: kto_loss(p[0], p[1], torch.ones(3, dtype=torch.bool, device=m)),
        "wpo_weights": lambda: wpo_weights(f(6), f(6), seg, 2, validate=False),
        "ld_token_weights": lambda: ld_token_weights(i(3, 6), seg, lens[:1], lens[:1], 0.5, validate=False),
        "ld_logps": lambda: ld_logps(f(6), i(3, 6), seg, lens[:1], lens[:1], 0.5, validate=False),
        "DPOLoss": lambda: DPOLoss()(*p),
        "FusedLinearDPOLoss": lambda: FusedLinearDPOLoss(validate=False)(w, x3, t2, ref_input=x3, ref_weight=w),
        "FusedLinearSimPOLoss": lambda: FusedLinearSimPOLoss(validate=False)(w, x3, t2),
        "FusedLinearCPOLoss": lambda: FusedLinearCPOLoss(grad_in_forward=True)(w, x3, t2),
        "FusedLinearORPOLoss": lambda: FusedLinearORPOLoss()(w, x3, t2),
    }


@pytest.mark.parametrize("op", list(_meta_cases()))
def test_meta_tensors_get_a_clear_error(op: str) -> None:
    with pytest.raises(ValueError, match="meta device"):
        _meta_cases()[op]()


# ---------------------------------------------------------------------------------------------------------------
# float64 always takes the torch path, backend="triton" included
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
def test_float64_with_triton_backend_takes_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(13, 5, dtype=torch.float64, generator=gen)
    lab = torch.randint(0, 13, (9,), generator=gen)
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    for fn, args in ((linear_sequence_logprobs, (h, w, lab)), (sequence_logprobs, (h @ w.T, lab))):
        got = fn(*args, segment_ids=seg, num_segments=4, backend="triton")
        ref = fn(*args, segment_ids=seg, num_segments=4, backend="torch")
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    values = torch.randn(9, dtype=torch.float64, generator=gen)
    got = segment_sum(values, seg, 4, backend="triton")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, segment_sum(values, seg, 4, backend="torch"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# num_segments / segment ids
# ---------------------------------------------------------------------------------------------------------------


def test_num_segments_without_segment_ids_is_an_error_in_both_ops() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 4, generator=gen)
    w = torch.randn(7, 4, generator=gen)
    lab = torch.randint(0, 7, (2, 3), generator=gen)
    with pytest.raises(ValueError, match="num_segments.*segment_ids"):
        linear_sequence_logprobs(h, w, lab, num_segments=5)
    with pytest.raises(ValueError, match="num_segments.*segment_ids"):
        sequence_logprobs(h @ w.T, lab, num_segments=5)


STRAY = 10**12  # a stray id this large must never size an allocation


def test_stray_huge_segment_id_with_inferred_count_is_refused() -> None:
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, generator=gen)
    w = torch.randn(7, 4, generator=gen)
    lab = torch.randint(0, 7, (6,), generator=gen)
    ids = torch.tensor([0, 0, 1, 1, 2, STRAY])
    for call in (
        lambda: linear_sequence_logprobs(h, w, lab, segment_ids=ids),
        lambda: sequence_logprobs(h @ w.T, lab, segment_ids=ids),
        lambda: segment_sum(h[:, 0], ids),
    ):
        with pytest.raises(ValueError, match=f"{STRAY + 1}.*pass num_segments explicitly"):
            call()
    # ids of ignored positions do not count (linear_sequence_logprobs infers from labelled positions only)
    lab[5] = -100
    assert linear_sequence_logprobs(h, w, lab, segment_ids=ids).shape == (3,)


def test_out_of_range_segment_ids_without_validation_add_to_no_segment() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], requires_grad=True)
    ids = torch.tensor([0, STRAY, 2, -1, 2, 0])
    out = segment_sum(values, ids, 3, validate=False)
    assert out.tolist() == [33.0, 0.0, 20.0]
    out.backward(torch.tensor([1.0, 10.0, 100.0]))
    assert values.grad.tolist() == [1.0, 0.0, 100.0, 0.0, 100.0, 1.0]
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    lab = torch.tensor([0, 1, 2, 3, 4, 0])
    seq = sequence_logprobs(logits, lab, segment_ids=ids, num_segments=3, average=True, validate=False)
    # segment 0 holds elements 0 and 5 only, segment 2 elements 2 and 4: the stray ones count nowhere
    lp = torch.log_softmax(logits, -1).gather(1, lab[:, None]).squeeze(1)
    torch.testing.assert_close(seq, torch.stack([(lp[0] + lp[5]) / 2, torch.zeros(()), (lp[2] + lp[4]) / 2]))


def test_token_helpers_with_out_of_range_sequence_ids_without_validation() -> None:
    # ids 9 and -1 lie outside [0, 2P) = [0, 4): no crash, and those tokens count toward no sequence
    logps = torch.tensor([-1.0, -2.0, -4.0, -8.0, -16.0, -32.0])
    pos = torch.tensor([0, 1, 0, 0, 3, 0])
    seq = torch.tensor([0, 0, 2, 9, 1, -1])
    chosen, rejected = torch.tensor([2, 5]), torch.tensor([1, 5])
    w = ld_token_weights(pos, seq, chosen, rejected, 0.5, validate=False)
    assert w.tolist() == [1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    out = ld_logps(logps, pos, seq, chosen, rejected, 0.5, validate=False)
    assert out.tolist() == [-2.0, -16.0, -4.0, 0.0]
    wpo = wpo_weights(logps, torch.zeros(6), seq, 4, validate=False)
    torch.testing.assert_close(wpo, torch.exp(torch.tensor([-1.5, -16.0, -4.0, 0.0])))
    with pytest.raises(ValueError, match="seq_ids"):
        ld_token_weights(pos, seq, chosen, rejected, 0.5)


def _allocated_bytes(fn: Callable[[], Any]) -> int:
    """Total bytes the CPU allocator handed out while ``fn`` ran (frees not subtracted: an upper bound on the peak)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_explicit_huge_num_segments_allocates_only_the_output() -> None:
    values = torch.randn(5, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([0, 3, 3, 999_999, 7])
    s = 1_000_000
    out = segment_sum(values, ids, s)
    assert out.shape == (s,) and out[3] == values[1] + values[2] and out[999_999] == values[3]
    used = _allocated_bytes(lambda: segment_sum(values, ids, s))
    assert used <= s * 4 + 64 * 1024, used  # the fp32 output plus O(N); no [S] counts or offsets


# ---------------------------------------------------------------------------------------------------------------
# grad_in_forward under torch.inference_mode computes the loss without gradients
# ---------------------------------------------------------------------------------------------------------------


def test_grad_in_forward_under_inference_mode_gives_the_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(10, 6, generator=gen, requires_grad=True)
    w = torch.randn(17, 6, generator=gen, requires_grad=True)
    lab = torch.randint(0, 17, (10,), generator=gen)
    lab[3] = -100
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    ref_lp = torch.randn(4, generator=gen)

    def loss_fn(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return -torch.nn.functional.logsigmoid(0.1 * ((s[0] - ref_lp[ids[0]]) - (s[1] - ref_lp[ids[1]])))

    groups = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    loss, seq = linear_logprobs_loss_grad_in_forward(h, w, lab, seg, 4, loss_fn, groups=groups)
    with torch.inference_mode():
        loss_inf, seq_inf = linear_logprobs_loss_grad_in_forward(h, w, lab, seg, 4, loss_fn, groups=groups)
    assert not loss_inf.requires_grad
    torch.testing.assert_close(loss_inf, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(seq_inf, seq, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [FusedLinearDPOLoss, FusedLinearSimPOLoss, FusedLinearCPOLoss, FusedLinearORPOLoss])
def test_fused_modules_grad_in_forward_under_inference_mode(cls: type) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, 6, generator=gen)
    w = torch.randn(19, 6, generator=gen)
    target = torch.randint(0, 19, (4, 5), generator=gen)
    target[:, :2] = -100
    kw = {"ref_input": x + 0.1, "ref_weight": w} if cls is FusedLinearDPOLoss else {}
    loss, aux = cls(grad_in_forward=True)(w.requires_grad_(), x.requires_grad_(), target, **kw)
    with torch.inference_mode():
        loss_inf, aux_inf = cls(grad_in_forward=True)(w, x, target, **kw)
    assert not loss_inf.requires_grad
    torch.testing.assert_close(loss_inf, loss.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(aux_inf, aux):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
