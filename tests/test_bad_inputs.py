"""Bad-input matrix for every public entry point.

For each of ``sequence_logprobs``, ``token_logprobs``, ``linear_sequence_logprobs``, ``linear_token_logprobs``,
``preference_loss``, ``nn.FusedLinearDPOLoss``, ``PreferenceCollator`` and ``DPOEngine.step``:

- invalid input (labels out of range, wrong dims / mismatched shapes, non-float activations, empty batch, tensors on
  different devices) raises ``ValueError``/``TypeError`` whose message names the offending argument — before any
  kernel launch (the Triton cases run through the interpreter on CPU, forced with ``backend="triton"``);
- legal corner cases work: a sequence / pair with an empty completion (log-prob 0, zero gradient), non-contiguous and
  strided inputs (results equal a float64 reference);
- NaN / inf activations propagate to the output as non-finite values with a ``RuntimeWarning``, never a silently
  finite wrong value.

Mixed devices cannot be built without a GPU except with the ``meta`` device, which is what these tests use.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from backends import BACKENDS
from helpers import perturbed_reference

from fastdpo.reference import naive_dpo_loss, naive_token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

NONFINITE = [float("nan"), float("inf")]


def _raises(exc: type[BaseException] | tuple[type[BaseException], ...], names: str, fn: Callable[[], Any]) -> str:
    """Assert ``fn()`` raises ``exc`` with a message naming one of ``names`` (a regex alternation)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert re.search(names, msg), f"error message does not name {names!r}: {msg!r}"
    return msg


def _expect_nonfinite_warning(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and require a RuntimeWarning about NaN/inf."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    hits = [w for w in caught if issubclass(w.category, RuntimeWarning) and re.search("nan|inf", str(w.message), re.I)]
    assert hits, f"no RuntimeWarning about NaN/inf; got {[str(w.message) for w in caught]}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# float64 oracles
# ---------------------------------------------------------------------------------------------------------------


def ref_token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """float64 ``log_softmax(logits)[label]``, 0 where ignored (differentiable)."""
    return naive_token_logprobs(logits.double(), labels, ignore_index=ignore_index)


def ref_linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return ref_token_logps(z, labels)


def _logits_case(b: int = 3, t: int = 5, v: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = -100
    return logits, labels


def _head_case(
    b: int = 3, t: int = 5, d: int = 11, v: int = 37, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.5
    bias = torch.randn(v, generator=g) * 0.1
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    return hidden, weight, bias, labels


# ---------------------------------------------------------------------------------------------------------------
# sequence_logprobs / token_logprobs
# ---------------------------------------------------------------------------------------------------------------


def _seq(logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    from fastdpo import sequence_logprobs

    return sequence_logprobs(logits, labels, **kw)


def _tok(logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    from fastdpo import token_logprobs

    return token_logprobs(logits, labels, **kw)


LOGIT_FNS = {"sequence_logprobs": _seq, "token_logprobs": _tok}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
def test_logits_labels_out_of_range(fn: str, backend: str) -> None:
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case()
    for bad in (37, 1000, -1, -101):
        lab = labels.clone()
        lab[1, 2] = bad
        msg = _raises(ValueError, "labels", lambda: f(logits, lab, backend=backend))
        assert str(bad) in msg
    # -100 is only legal when it is the ignore_index
    lab = labels.clone()
    lab[2, 3] = -100
    _raises(ValueError, "labels", lambda: f(logits, lab, ignore_index=-1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
def test_logits_wrong_dims_and_dtypes(fn: str, backend: str) -> None:
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case()
    _raises(ValueError, "labels|logits", lambda: f(logits, labels[:, :-1], backend=backend))
    _raises(ValueError, "labels|logits", lambda: f(logits, labels.unsqueeze(-1), backend=backend))
    _raises(ValueError, "labels|logits", lambda: f(logits[0, 0], labels[0, 0], backend=backend))  # 1-D logits
    _raises(TypeError, "logits", lambda: f(logits.long(), labels, backend=backend))
    _raises(TypeError, "logits", lambda: f(logits > 0, labels, backend=backend))
    _raises(TypeError, "labels", lambda: f(logits, labels.float(), backend=backend))
    _raises(TypeError, "logits", lambda: f(logits.tolist(), labels, backend=backend))
    if fn == "sequence_logprobs":  # [N, V] needs segment_ids; [B, T, V] must not get them
        _raises(ValueError, "logits|segment_ids", lambda: f(logits[0], labels[0], backend=backend))
        seg = torch.zeros(3, dtype=torch.long)
        _raises(ValueError, "logits|segment_ids", lambda: f(logits, labels, segment_ids=seg, backend=backend))
        flat, flat_labels = logits.reshape(-1, 37), labels.reshape(-1)
        seg = torch.arange(15) // 5
        _raises(ValueError, "segment_ids", lambda: f(flat, flat_labels, segment_ids=seg[:-1], backend=backend))
        _raises(TypeError, "segment_ids", lambda: f(flat, flat_labels, segment_ids=seg.float(), backend=backend))
        bad = seg.clone()
        bad[4] = 7
        _raises(
            ValueError, "segment_ids", lambda: f(flat, flat_labels, segment_ids=bad, num_segments=3, backend=backend)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
def test_logits_empty_batch(fn: str, backend: str) -> None:
    """No rows at all (user-supplied logits): a clear ValueError naming the empty batch, before any kernel."""
    f = LOGIT_FNS[fn]
    logits = torch.randn(0, 4, 37)
    labels = torch.zeros(0, 4, dtype=torch.long)
    _raises(ValueError, r"empty batch: logits has shape \[0, 4, 37\]", lambda: f(logits, labels, backend=backend))
    if fn == "token_logprobs":  # flat [N, V] rows
        _raises(ValueError, "empty batch", lambda: f(logits.view(0, 37), labels.view(0), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
def test_logits_empty_completion_row(fn: str, backend: str) -> None:
    """A row with no scored token is legal: its log-prob is exactly 0 and its logits get exactly zero gradient."""
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case()
    labels[1] = -100
    x = logits.clone().requires_grad_(True)
    out = f(x, labels, backend=backend)
    ref = ref_token_logps(logits, labels)
    ref = ref.sum(-1) if fn == "sequence_logprobs" else ref
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (out[1] == 0).all()
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all(), "an empty-completion row received gradient"
    # every row empty
    x.grad = None
    out = f(x, torch.full_like(labels, -100), backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf"])
def test_logits_nonfinite_propagates_with_warning(fn: str, backend: str, bad: float) -> None:
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case()
    logits[2, 3, 5] = bad  # a scored position of row 2 (label != 5 or == 5: either way logsumexp is inf / NaN)
    assert labels[2, 3] != -100
    out = _expect_nonfinite_warning(lambda: f(logits, labels, backend=backend))
    hit = out[2] if fn == "sequence_logprobs" else out[2, 3]
    assert not torch.isfinite(hit), f"NaN/inf logits gave a finite log-prob {float(hit)}"
    # rows without the bad value are untouched
    ref = ref_token_logps(logits[:2], labels[:2])
    ref = ref.sum(-1) if fn == "sequence_logprobs" else ref
    torch.testing.assert_close(out[:2].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_minus_inf_is_a_legal_mask(backend: str) -> None:
    """-inf on a non-label vocabulary entry (a masked token) is not an error: results equal float64."""
    from fastdpo import sequence_logprobs

    logits, labels = _logits_case()
    logits[:, :, 36] = float("-inf")
    labels = torch.where(labels == 36, 0, labels)
    x = logits.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sequence_logprobs(x, labels, backend=backend)
    xr = logits.double().requires_grad_(True)
    ref = ref_token_logps(xr, labels).sum(-1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(3, dtype=torch.float32)
    out.backward(g)
    ref.backward(g.double())
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def _strided_logits_views(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of the same values with unusual strides: time-strided, batch-transposed, vocab-strided."""
    b, t, v = logits.shape
    big = torch.zeros(b, 2 * t, v)
    big[:, ::2] = logits
    tb = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, V] with batch stride V
    wide = torch.zeros(b, t, 2 * v)
    wide[..., ::2] = logits
    return {"time_strided": big[:, ::2], "transposed": tb, "vocab_strided": wide[..., ::2]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(LOGIT_FNS))
@pytest.mark.parametrize("view", ["time_strided", "transposed", "vocab_strided"])
def test_logits_noncontiguous_inputs(fn: str, backend: str, view: str) -> None:
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case(b=3, t=6, v=41, seed=3)
    x = _strided_logits_views(logits)[view]
    assert not x.is_contiguous()
    x.requires_grad_(True)
    lab = torch.zeros(3, 12, dtype=torch.long)
    lab[:, ::2] = labels  # strided labels too
    lab = lab[:, ::2]
    assert not lab.is_contiguous()
    out = f(x, lab, backend=backend)
    xr = logits.double().requires_grad_(True)
    ref = ref_token_logps(xr, labels)
    ref = ref.sum(-1) if fn == "sequence_logprobs" else ref
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", list(LOGIT_FNS))
def test_logits_mixed_devices(fn: str) -> None:
    f = LOGIT_FNS[fn]
    logits, labels = _logits_case()
    _raises(ValueError, "device", lambda: f(logits.to("meta"), labels))
    msg = _raises(ValueError, "device", lambda: f(logits, labels.to("meta")))
    assert "logits" in msg and "labels" in msg, msg
    if fn == "sequence_logprobs":
        seg = (torch.arange(15) // 5).to("meta")
        _raises(ValueError, "segment_ids", lambda: f(logits.reshape(-1, 37), labels.reshape(-1), segment_ids=seg))


# ---------------------------------------------------------------------------------------------------------------
# linear_sequence_logprobs / linear_token_logprobs
# ---------------------------------------------------------------------------------------------------------------


def _lseq(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    from fastdpo import linear_sequence_logprobs

    return linear_sequence_logprobs(hidden, weight, labels, **kw)


def _ltok(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    from fastdpo import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, labels, **kw).logprobs


HEAD_FNS = {"linear_sequence_logprobs": _lseq, "linear_token_logprobs": _ltok}


def _head_ref(fn: str, hidden, weight, labels, bias=None) -> torch.Tensor:
    tok = ref_linear_token_logps(hidden, weight, labels, bias)
    return tok.sum(-1) if fn == "linear_sequence_logprobs" else tok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_labels_out_of_range(fn: str, backend: str) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case()
    for bad in (37, 5000, -1, -7):
        lab = labels.clone()
        lab[2, 4] = bad
        msg = _raises(ValueError, "labels", lambda: f(hidden, weight, lab, bias=bias, backend=backend))
        assert str(bad) in msg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_wrong_dims_and_dtypes(fn: str, backend: str) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case()
    kw = dict(backend=backend)
    _raises(ValueError, "hidden|weight", lambda: f(hidden[..., :-1], weight, labels, **kw))  # D mismatch
    _raises(ValueError, "weight", lambda: f(hidden, weight[0], labels, **kw))  # 1-D weight
    _raises(ValueError, "weight", lambda: f(hidden, weight.unsqueeze(0), labels, **kw))  # 3-D weight
    _raises(ValueError, "labels|hidden", lambda: f(hidden, weight, labels[:, :-1], **kw))
    _raises(ValueError, "labels|hidden", lambda: f(hidden, weight, labels.T, **kw))
    _raises(ValueError, "bias", lambda: f(hidden, weight, labels, bias=bias[:-1], **kw))
    _raises(ValueError, "bias", lambda: f(hidden, weight, labels, bias=bias.unsqueeze(0), **kw))
    _raises(TypeError, "hidden", lambda: f(hidden.long(), weight, labels, **kw))
    _raises(TypeError, "weight", lambda: f(hidden, weight.to(torch.int32), labels, **kw))
    _raises(TypeError, "bias", lambda: f(hidden, weight, labels, bias=bias.long(), **kw))
    _raises(TypeError, "labels", lambda: f(hidden, weight, labels.double(), **kw))
    for name, value in (("softcap", 0.0), ("logit_scale", -1.0), ("temperature", 0.0), ("temperature", float("nan"))):
        _raises((ValueError, TypeError), name, lambda: f(hidden, weight, labels, **{name: value}, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_empty_batch(fn: str, backend: str) -> None:
    """No tokens reach the head: legal (the engine hands it ``[0, D]`` when every completion of a batch is empty), a
    correctly shaped empty fp32 result whose backward gives an all-zero weight gradient -- never a kernel launch on
    an empty grid or a NaN."""
    f = HEAD_FNS[fn]
    _, weight, _, _ = _head_case()
    weight = weight.clone().requires_grad_(True)
    cases = [
        (
            torch.randn(0, 5, 11),
            torch.zeros(0, 5, dtype=torch.long),
            (0,) if fn == "linear_sequence_logprobs" else (0, 5),
        )
    ]
    if fn == "linear_token_logprobs":  # the flat [0, D] tokens the engine's head call gets
        cases.append((torch.randn(0, 11), torch.zeros(0, dtype=torch.long), (0,)))
    for hidden, labels, expected in cases:
        hidden.requires_grad_(True)
        out = f(hidden, weight, labels, backend=backend)
        assert tuple(out.shape) == expected and out.dtype == torch.float32
        weight.grad = None
        out.sum().backward()
        assert hidden.grad is not None and hidden.grad.shape == hidden.shape
        assert weight.grad is not None and weight.grad.shape == weight.shape and not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_empty_completion_row(fn: str, backend: str) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case()
    labels[1] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    out = f(h, w, labels, bias=b, backend=backend)
    torch.testing.assert_close(out.double(), _head_ref(fn, hidden, weight, labels, bias), rtol=1e-5, atol=1e-5)
    assert (out[1] == 0).all()
    out.sum().backward()
    assert (h.grad[1] == 0).all(), "hidden states of an empty-completion row received gradient"
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    # no scored token anywhere: zeros, zero gradients (the head projects nothing)
    h.grad = w.grad = b.grad = None
    out = f(h, w, torch.full_like(labels, -100), bias=b, backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        assert t.grad is None or (t.grad == 0).all(), f"{name} got gradient from an all-ignored batch"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf"])
def test_head_nonfinite_hidden_propagates_with_warning(fn: str, backend: str, bad: float) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case()
    hidden[2, 3, 4] = bad
    assert labels[2, 3] != -100
    h = hidden.clone().requires_grad_(True)
    out = _expect_nonfinite_warning(lambda: f(h, weight, labels, bias=bias, backend=backend))
    hit = out[2] if fn == "linear_sequence_logprobs" else out[2, 3]
    assert not torch.isfinite(hit), f"NaN/inf hidden state gave a finite log-prob {float(hit)}"
    ref = _head_ref(fn, hidden[:2], weight, labels[:2], bias)
    torch.testing.assert_close(out[:2].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_nonfinite_weight_propagates_with_warning(backend: str) -> None:
    from fastdpo import linear_sequence_logprobs

    hidden, weight, bias, labels = _head_case()
    weight[7, 2] = float("nan")
    out = _expect_nonfinite_warning(lambda: linear_sequence_logprobs(hidden, weight, labels, backend=backend))
    assert torch.isnan(out).all(), f"a NaN weight row must make every scored sequence NaN, got {out}"


def _strided_head_inputs(hidden, weight, labels):
    b, t, d = hidden.shape
    hs = torch.zeros(t, b, 2 * d)
    hs[..., ::2] = hidden.transpose(0, 1)
    h_view = hs.transpose(0, 1)[..., ::2]  # [B, T, D], strides everywhere
    w_view = weight.T.contiguous().T  # [V, D] column-major
    ls = torch.zeros(b, 2 * t, dtype=torch.long)
    ls[:, 1::2] = labels
    return h_view, w_view, ls[:, 1::2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_noncontiguous_inputs(fn: str, backend: str) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case(b=2, t=7, d=13, v=29, seed=5)
    h_view, w_view, l_view = _strided_head_inputs(hidden, weight, labels)
    assert not (h_view.is_contiguous() or w_view.is_contiguous() or l_view.is_contiguous())
    h_view.requires_grad_(True)
    w_view.requires_grad_(True)
    b_view = torch.zeros(2 * 29)
    b_view[::2] = bias
    b_view = b_view[::2].requires_grad_(True)
    out = f(h_view, w_view, l_view, bias=b_view, backend=backend)
    hr, wr, br = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    ref = _head_ref(fn, hr, wr, labels, br)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape)
    out.backward(g)
    ref.backward(g.double())
    for got, want, name in ((h_view, hr, "hidden"), (w_view, wr, "weight"), (b_view, br, "bias")):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fn", list(HEAD_FNS))
def test_head_mixed_devices(fn: str) -> None:
    f = HEAD_FNS[fn]
    hidden, weight, bias, labels = _head_case()
    meta = "meta"
    _raises(ValueError, "device", lambda: f(hidden.to(meta), weight, labels))
    msg = _raises(ValueError, "device", lambda: f(hidden, weight.to(meta), labels))
    assert "weight" in msg, msg
    msg = _raises(ValueError, "device", lambda: f(hidden, weight, labels.to(meta)))
    assert "labels" in msg, msg
    msg = _raises(ValueError, "device", lambda: f(hidden, weight, labels, bias=bias.to(meta)))
    assert "bias" in msg, msg


@pytest.mark.gpu  # real CPU/CUDA mixes need a GPU (meta covers CPU runs)
def test_mixed_cpu_cuda_devices() -> None:
    from fastdpo import linear_sequence_logprobs, preference_loss, sequence_logprobs

    logits, labels = _logits_case()
    _raises(ValueError, "device", lambda: sequence_logprobs(logits.cuda(), labels))
    hidden, weight, bias, labels = _head_case()
    msg = _raises(ValueError, "device", lambda: linear_sequence_logprobs(hidden.cuda(), weight, labels.cuda()))
    assert "weight" in msg, msg
    pc, pr, rc, rr = _pl_inputs()
    _raises(ValueError, "device", lambda: preference_loss(pc.cuda(), pr.cuda(), rc, rr.cuda()))


# ---------------------------------------------------------------------------------------------------------------
# preference_loss
# ---------------------------------------------------------------------------------------------------------------


def _pl_inputs(p: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(p, generator=g) * 20 + 1) for _ in range(4)]


def _pl(*args: Any, **kw: Any) -> Any:
    from fastdpo import preference_loss

    return preference_loss(*args, **kw)


def _sigmoid_ref(pc, pr, rc, rr, beta: float = 0.1) -> torch.Tensor:
    return naive_dpo_loss(torch.cat([pc, pr]).double(), torch.cat([rc, rr]).double(), beta)


def test_preference_loss_bad_inputs() -> None:
    pc, pr, rc, rr = _pl_inputs()
    _raises(ValueError, "policy_rejected_logps", lambda: _pl(pc, pr[:-1], rc, rr))
    _raises(ValueError, "ref_chosen_logps", lambda: _pl(pc, pr, rc[:3], rr))
    _raises(ValueError, "ref_rejected_logps", lambda: _pl(pc, pr, rc, rr.unsqueeze(0)))
    _raises(ValueError, "policy_chosen_logps", lambda: _pl(pc.unsqueeze(1), pr, rc, rr))
    _raises(TypeError, "policy_chosen_logps", lambda: _pl(pc.long(), pr, rc, rr))
    _raises(TypeError, "ref_rejected_logps", lambda: _pl(pc, pr, rc, rr.long()))
    _raises(TypeError, "policy_rejected_logps", lambda: _pl(pc, pr.tolist(), rc, rr))
    _raises(ValueError, "loss_type", lambda: _pl(pc, pr, rc, rr, loss_type="sigmoidd"))
    _raises(ValueError, "beta", lambda: _pl(pc, pr, rc, rr, beta=0.0))
    _raises(ValueError, "beta", lambda: _pl(pc, pr, rc, rr, beta=-0.5))
    _raises(ValueError, "chosen_lengths", lambda: _pl(pc, pr, rc, rr, loss_type="ipo"))
    _raises(
        ValueError,
        "chosen_lengths",
        lambda: _pl(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(5)),
    )
    # empty batch
    e = torch.zeros(0)
    _raises(ValueError, "pair|empty|policy_chosen_logps", lambda: _pl(e, e, e, e))
    # mixed devices
    msg = _raises(ValueError, "device", lambda: _pl(pc, pr, rc.to("meta"), rr))
    assert "ref_chosen_logps" in msg, msg


def test_preference_loss_empty_completion_and_strided() -> None:
    """A pair whose completions are empty has log-probs exactly 0: legal, finite. Strided inputs are fine."""
    pc, pr, rc, rr = _pl_inputs(p=6, seed=1)
    pc[2] = pr[2] = rc[2] = rr[2] = 0.0
    x = pc.clone().requires_grad_(True)
    loss, metrics = _pl(x, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(loss.double(), _sigmoid_ref(pc, pr, rc, rr, 0.3), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for v in metrics.values():
        assert torch.isfinite(torch.as_tensor(v)).all()
    big = torch.stack(_pl_inputs(p=12, seed=2) + _pl_inputs(p=12, seed=3), dim=1)  # [12, 8]
    views = [big[::2, k] for k in (0, 3, 5, 7)]
    assert not views[0].is_contiguous()
    loss_v, _ = _pl(*views, beta=0.2)
    loss_c, _ = _pl(*(v.contiguous() for v in views), beta=0.2)
    assert torch.equal(loss_v, loss_c)
    torch.testing.assert_close(loss_v.double(), _sigmoid_ref(*views, 0.2), rtol=1e-6, atol=1e-7)


# NaN anywhere, and the infinities that push a pair's loss to +inf (chosen policy / rejected reference log-prob
# -inf, or rejected policy / chosen reference +inf). The opposite infinities saturate that pair's sigmoid loss at its
# exact limit 0, which is a correct finite value.
NONFINITE_PL = [(w, float("nan")) for w in range(4)] + [
    (0, float("-inf")),
    (1, float("inf")),
    (2, float("inf")),
    (3, float("-inf")),
]


@pytest.mark.parametrize("which,bad", NONFINITE_PL)
def test_preference_loss_nonfinite_propagates(which: int, bad: float) -> None:
    args = _pl_inputs()
    args[which][3] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, _ = _pl(*args)
    assert not torch.isfinite(loss), f"{bad} in argument {which} gave a finite loss {float(loss)}"


# ---------------------------------------------------------------------------------------------------------------
# nn.FusedLinearDPOLoss (Liger-compatible call: lin_weight, _input [2B, T, D], target [2B, T])
# ---------------------------------------------------------------------------------------------------------------


def _dpo_case(b: int = 2, t: int = 6, d: int = 10, v: int = 31, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * b, t, d, generator=g)
    ref_x = x + 0.1 * torch.randn(2 * b, t, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    ref_w = w + 0.05 * torch.randn(v, d, generator=g)
    target = torch.randint(0, v, (2 * b, t), generator=g)
    target[:, :2] = -100  # prompt
    return w, x, target, ref_x, ref_w


def _dpo_loss_ref(w, x, target, ref_x, ref_w, beta: float = 0.1) -> torch.Tensor:
    lp = ref_linear_token_logps(x, w, target).sum(-1)
    with torch.no_grad():
        rlp = ref_linear_token_logps(ref_x, ref_w, target).sum(-1)
    b = x.shape[0] // 2
    return _sigmoid_ref(lp[:b], lp[b:], rlp[:b], rlp[b:], beta)


def _fused_dpo(**kw: Any) -> Any:
    from fastdpo.nn import FusedLinearDPOLoss

    return FusedLinearDPOLoss(**kw)


def test_fused_dpo_loss_bad_inputs() -> None:
    loss_fn = _fused_dpo(beta=0.1)
    w, x, target, ref_x, ref_w = _dpo_case()
    kw = dict(ref_input=ref_x, ref_weight=ref_w)
    bad = target.clone()
    bad[1, 3] = 31
    _raises(ValueError, "target|labels", lambda: loss_fn(w, x, bad, **kw))
    _raises(ValueError, "_input|rows", lambda: loss_fn(w, x[:3], target[:3], ref_input=ref_x[:3], ref_weight=ref_w))
    _raises(ValueError, "_input", lambda: loss_fn(w, x[0], target[0], **kw))
    _raises(ValueError, "target", lambda: loss_fn(w, x, target[:, :-1], **kw))
    _raises(ValueError, "lin_weight", lambda: loss_fn(w[:, :-1], x, target, **kw))
    _raises(ValueError, "ref_input", lambda: loss_fn(w, x, target, ref_input=ref_x[:2], ref_weight=ref_w))
    _raises(ValueError, "ref_input|ref_weight", lambda: loss_fn(w, x, target))
    _raises(TypeError, "_input", lambda: loss_fn(w, x.long(), target, **kw))
    _raises(TypeError, "lin_weight", lambda: loss_fn(w.long(), x, target, **kw))
    _raises(TypeError, "target", lambda: loss_fn(w, x, target.float(), **kw))
    _raises(
        ValueError, "_input|rows|empty", lambda: loss_fn(w, x[:0], target[:0], ref_input=ref_x[:0], ref_weight=ref_w)
    )
    msg = _raises(ValueError, "device", lambda: loss_fn(w, x.to("meta"), target, **kw))
    assert "_input" in msg, msg
    msg = _raises(ValueError, "device", lambda: loss_fn(w, x, target, ref_input=ref_x.to("meta"), ref_weight=ref_w))
    assert "ref_input" in msg, msg


def test_fused_dpo_loss_empty_completion_and_strided() -> None:
    loss_fn = _fused_dpo(beta=0.1)
    w, x, target, ref_x, ref_w = _dpo_case(b=3, seed=4)
    target[1] = -100  # chosen answer of pair 1 is empty
    target[3 + 2] = -100  # rejected answer of pair 2 is empty
    xs = torch.zeros(x.shape[1], x.shape[0], 2 * x.shape[2])
    xs[..., 1::2] = x.transpose(0, 1)
    x_view = xs.transpose(0, 1)[..., 1::2].requires_grad_(True)  # non-contiguous [2B, T, D]
    w_view = w.T.contiguous().T.requires_grad_(True)
    loss, aux = loss_fn(w_view, x_view, target, ref_input=ref_x, ref_weight=ref_w)
    chosen_logps = aux[0]
    assert chosen_logps[1] == 0
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = _dpo_loss_ref(wr, xr, target, ref_x, ref_w)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x_view.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_view.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    assert (x_view.grad[1] == 0).all() and (x_view.grad[5] == 0).all()


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf"])
def test_fused_dpo_loss_nonfinite_input(bad: float) -> None:
    loss_fn = _fused_dpo(beta=0.1)
    w, x, target, ref_x, ref_w = _dpo_case()
    x[1, 4, 3] = bad
    assert target[1, 4] != -100
    loss, _ = _expect_nonfinite_warning(lambda: loss_fn(w, x, target, ref_input=ref_x, ref_weight=ref_w))
    assert not torch.isfinite(loss), f"NaN/inf policy hidden state gave a finite loss {float(loss)}"


# ---------------------------------------------------------------------------------------------------------------
# PreferenceCollator and DPOEngine.step
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts() -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    from fastdpo import tiny

    tok = tiny.make_tokenizer()
    policy = tiny.make_model("llama", tok, attn_implementation="eager", seed=0).train()
    return tok, policy, perturbed_reference(policy, seed=1)


ROWS = [
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " Green."},
    {"prompt": "Tell me a joke", "chosen": " Why did the computer sneeze?", "rejected": " No."},
]


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_collator_bad_rows(tiny_parts: Any, packing: str) -> None:
    from fastdpo import PreferenceCollator

    tok = tiny_parts[0]
    collate = PreferenceCollator(tok, packing=packing)
    _raises(ValueError, "rows|empty", lambda: collate([]))
    _raises((ValueError, TypeError), "rows", lambda: collate("not a list of rows"))
    _raises((ValueError, TypeError), "chosen", lambda: collate([{"prompt": "a", "rejected": "b"}]))
    _raises(TypeError, "prompt", lambda: collate([{"prompt": 3, "chosen": "a", "rejected": "b"}]))
    _raises(TypeError, "rejected", lambda: collate([{"prompt": "x", "chosen": "a", "rejected": None}]))
    v = len(tok)
    _raises(
        ValueError,
        "chosen_input_ids|vocab",
        lambda: collate([{"prompt_input_ids": [1, 5], "chosen_input_ids": [7, v], "rejected_input_ids": [8]}]),
    )
    _raises(
        (ValueError, TypeError),
        "prompt_input_ids",
        lambda: collate([{"prompt_input_ids": [1, 2.5], "chosen_input_ids": [7], "rejected_input_ids": [8]}]),
    )
    _raises(ValueError, "rejected_input_ids", lambda: collate([{"prompt_input_ids": [1, 5], "chosen_input_ids": [7]}]))
    _raises(ValueError, "packing", lambda: PreferenceCollator(tok, packing="tight"))
    _raises(ValueError, "max_length", lambda: PreferenceCollator(tok, max_length=0))


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_collator_and_engine_empty_completion(tiny_parts: Any, packing: str) -> None:
    """A pair whose chosen completion is empty is legal: length 0, log-prob exactly 0, finite loss and grads.

    String completions get an EOS appended (TRL semantics), so the empty completion is given pre-tokenized.
    """
    from fastdpo import DPOEngine, PreferenceCollator

    tok, policy, ref = tiny_parts
    ids = [tok(r["prompt"])["input_ids"] for r in ROWS]
    comp = [
        (
            tok(r["chosen"], add_special_tokens=False)["input_ids"],
            tok(r["rejected"], add_special_tokens=False)["input_ids"],
        )
        for r in ROWS
    ]
    rows = [
        {"prompt_input_ids": ids[0], "chosen_input_ids": comp[0][0], "rejected_input_ids": comp[0][1]},
        {"prompt_input_ids": ids[1], "chosen_input_ids": [], "rejected_input_ids": comp[1][1]},
    ]
    batch = PreferenceCollator(tok, packing=packing)(rows)
    assert int(batch["chosen_lengths"][1]) == 0 and int(batch["chosen_lengths"][0]) == len(comp[0][0])
    assert not bool((batch["logp_seq"] == 1).any()), "tokens scored for an empty completion"
    engine = DPOEngine(policy, ref, loss_type="sigmoid", beta=0.1)
    policy.zero_grad(set_to_none=True)
    out = engine.compute_logps(policy, batch, with_grad=False)
    assert float(out["chosen_logps"][1]) == 0.0
    assert torch.isfinite(out["chosen_logps"]).all() and torch.isfinite(out["rejected_logps"]).all()
    loss, metrics = engine.step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in policy.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    policy.zero_grad(set_to_none=True)


def test_engine_bad_batches(tiny_parts: Any) -> None:
    from fastdpo import DPOEngine, PreferenceCollator

    tok, policy, ref = tiny_parts
    engine = DPOEngine(policy, ref, loss_type="sigmoid", beta=0.1)
    batch = PreferenceCollator(tok)(ROWS)
    _raises(TypeError, "batch", lambda: engine.step([batch]))
    for key in ("input_ids", "logp_index", "logp_labels", "num_pairs"):
        broken = {k: v for k, v in batch.items() if k != key}
        _raises(ValueError, key, lambda: engine.step(broken))
    bad = dict(batch)
    bad["logp_labels"] = batch["logp_labels"].clone()
    bad["logp_labels"][0] = len(tok) + 3
    _raises(ValueError, "labels", lambda: engine.step(bad))
    bad = dict(batch)
    bad["logp_seq"] = batch["logp_seq"][:-1]
    _raises(ValueError, "logp_seq", lambda: engine.step(bad))
    bad = dict(batch)
    bad["logp_index"] = batch["logp_index"].clone()
    bad["logp_index"][-1] = batch["input_ids"].numel() + 5
    _raises((ValueError, IndexError), "logp_index|index", lambda: engine.step(bad))
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    _raises((ValueError, TypeError), "device", lambda: engine.step(meta))
    policy.zero_grad(set_to_none=True)


def test_engine_nan_weights_give_nan_loss_with_warning(tiny_parts: Any) -> None:
    from fastdpo import DPOEngine, PreferenceCollator

    tok, policy, ref = tiny_parts
    broken = copy.deepcopy(policy)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")  # every final hidden state gets a NaN
    engine = DPOEngine(broken, ref, loss_type="sigmoid", beta=0.1)
    batch = PreferenceCollator(tok)(ROWS)
    loss, _ = _expect_nonfinite_warning(lambda: engine.step(batch))
    assert torch.isnan(loss), f"NaN weights gave a finite loss {float(loss)}"
