"""Log-probs from logits (``fastdpo.logprobs``): accuracy vs float64, gradients, saved memory, determinism, errors.

Both backends run on CPU: ``backend="torch"`` (chunked pure-PyTorch path) and ``backend="triton"`` (the kernels
through ``TRITON_INTERPRET=1``, set by conftest). Shapes stay small for the interpreter; ``block_v`` and
``chunk_rows`` are passed small so the vocabulary loop and the row chunking both run several iterations.

Accuracy rule: error against a float64 reference no larger than the naive PyTorch path's error (``log_softmax`` +
``gather`` in the same dtype) plus a small tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo.logprobs import naive_sequence_logprobs, sequence_logprobs, token_logprobs

# Triton kernels on CPU tensors need the interpreter (conftest sets it except under `pytest -m gpu`); the compiled
# kernels are exercised by the gpu-marked test_cuda_* tests instead.
BACKENDS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def _small(backend: str) -> dict:
    """Small tuning knobs: several V blocks per row (Triton) / several row chunks (torch)."""
    return {"block_v": 256} if backend == "triton" else {"chunk_rows": 7}


def _case(
    shape: tuple[int, ...], vocab: int, dtype: torch.dtype, seed: int, masked_rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits ``[*shape, V]`` (scale 4: peaked like an LM's) and labels with ~25% ignored tokens.

    The first ``masked_rows`` sequences (dim 0) are fully ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 4 - 2).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.25] = IGNORE
    labels[:masked_rows] = IGNORE
    return logits, labels


def _grad_tol(dtype: torch.dtype, backend: str, gmax: float) -> float:
    """Extra gradient error allowed over the naive path's.

    fp32 rounding noise, plus, for bf16 through the Triton *interpreter*, half a bf16 ulp: the interpreter truncates
    fp32 -> bf16 stores (GPUs round to nearest even, which is within the naive error).
    """
    tol = 2e-6 * gmax
    if dtype == torch.bfloat16 and backend == "triton":
        tol += gmax * 2.0**-8
    return tol


def _check_against_float64(
    logits: torch.Tensor, labels: torch.Tensor, backend: str, seed: int, tuning: dict | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and gradient of ``sequence_logprobs`` vs float64, within the naive same-dtype error budget.

    Returns our ``(output, logits gradient)``.
    """
    gen = torch.Generator().manual_seed(seed)
    x64 = logits.double().requires_grad_()
    ref = naive_sequence_logprobs(x64, labels, **kwargs)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(logits.device)
    ref.backward(grad_out)

    xn = logits.clone().requires_grad_()
    naive = naive_sequence_logprobs(xn, labels, **kwargs)
    naive.backward(grad_out.float())

    xo = logits.clone().requires_grad_()
    out = sequence_logprobs(xo, labels, backend=backend, **kwargs, **(_small(backend) if tuning is None else tuning))
    assert out.dtype == torch.float32 and out.shape == ref.shape
    out.backward(grad_out.float())
    assert xo.grad.dtype == logits.dtype and xo.grad.shape == logits.shape

    err = (out.double() - ref.detach()).abs().max().item()
    naive_err = (naive.double() - ref.detach()).abs().max().item()
    assert err <= naive_err + 2e-6 * max(1.0, ref.abs().max().item()), (err, naive_err)

    gmax = x64.grad.abs().max().item()
    gerr = (xo.grad.double() - x64.grad).abs().max().item()
    naive_gerr = (xn.grad.double() - x64.grad).abs().max().item()
    assert gerr <= naive_gerr + _grad_tol(logits.dtype, backend, gmax), (gerr, naive_gerr)
    return out, xo.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_matches_float64(backend: str, dtype: torch.dtype) -> None:
    # V = 1031: the last 256-wide block holds 7 columns; 25% masked tokens; row 0 has no completion token.
    logits, labels = _case((4, 9), 1031, dtype, seed=1)
    out, grad = _check_against_float64(logits, labels, backend, seed=2)
    assert out[0] == 0 and torch.count_nonzero(grad[0]) == 0
    # Ignored positions get exactly zero gradient.
    assert torch.count_nonzero(grad[labels == IGNORE]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_sequences_with_average(backend: str, dtype: torch.dtype) -> None:
    logits, labels = _case((6, 1), 1000, dtype, seed=3)  # T = 1
    _check_against_float64(logits, labels, backend, seed=4, average=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segments_match_float64(backend: str, dtype: torch.dtype) -> None:
    logits, labels = _case((30,), 1283, dtype, seed=5, masked_rows=0)
    gen = torch.Generator().manual_seed(6)
    segment_ids = torch.randint(0, 7, (30,), generator=gen)
    segment_ids[segment_ids == 4] = 5  # segment 4 is empty; segment 7 (num_segments=8) too
    labels[segment_ids == 2] = IGNORE  # segment 2 has tokens but none scored
    kwargs = {"segment_ids": segment_ids, "num_segments": 8}
    out, grad = _check_against_float64(logits, labels, backend, seed=7, **kwargs)
    assert out[2] == 0 and out[4] == 0 and out[7] == 0
    assert torch.count_nonzero(grad[segment_ids == 2]) == 0
    avg = sequence_logprobs(logits, labels, backend=backend, average=True, **kwargs, **_small(backend))
    ref_avg = naive_sequence_logprobs(logits.double(), labels, average=True, **kwargs)
    torch.testing.assert_close(avg.double(), ref_avg, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs(backend: str) -> None:
    logits, labels = _case((2, 3, 5), 999, torch.float32, seed=8)  # 4-D logits [2, 3, 5, V]
    x = logits.clone().requires_grad_()
    tok = token_logprobs(x, labels, backend=backend, **_small(backend))
    assert tok.shape == labels.shape and tok.dtype == torch.float32
    valid = labels != IGNORE
    x64 = logits.double().requires_grad_()
    ref = torch.where(valid, torch.log_softmax(x64, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    torch.testing.assert_close(tok.double(), ref.detach(), rtol=0, atol=1e-5)
    assert torch.count_nonzero(tok[~valid]) == 0
    gen = torch.Generator().manual_seed(9)
    grad_out = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    tok.backward(grad_out.float())
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend: str) -> None:
    # Shifted slice logits[:, :-1] (rows not evenly strided), a vocab-strided view, non-contiguous labels.
    full, labels_full = _case((3, 8), 1200, torch.float32, seed=10)
    sliced = full[:, :-1]
    labels = labels_full.t().contiguous().t()[:, 1:]
    assert not sliced.is_contiguous() and not labels.is_contiguous()
    _check_against_float64(sliced, labels, backend, seed=11)
    vocab_major = full.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # stride along V is B*T
    assert vocab_major.stride(-1) != 1
    _check_against_float64(vocab_major, labels_full, backend, seed=12)


def test_gradcheck_float64_torch_path() -> None:
    logits, labels = _case((3, 4), 11, torch.float64, seed=13)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: sequence_logprobs(x, labels, backend="torch", chunk_rows=5, average=True), (logits,)
    )
    flat, flat_labels = logits.detach().reshape(12, 11).requires_grad_(), labels.reshape(12)
    ids = torch.tensor([0, 0, 2, 1, 1, 1, 2, 0, 3, 3, 1, 0])
    assert torch.autograd.gradcheck(
        lambda x: sequence_logprobs(x, flat_labels, segment_ids=ids, backend="torch", chunk_rows=5), (flat,)
    )
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, flat_labels, backend="torch"), (flat,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "segments"])
def test_saved_state_is_linear_in_tokens(backend: str, layout: str) -> None:
    """Besides the logits themselves, backward keeps O(N) bytes: never an [N, V] tensor (fp32 or otherwise)."""
    n_seq, seq_len, vocab = 4, 8, 1000
    logits, labels = _case((n_seq, seq_len), vocab, torch.bfloat16, seed=14)
    x = logits.clone().requires_grad_()
    inp = x * 1.0  # a non-leaf (what an lm head hands over); MulBackward saves nothing [N, V]-sized
    kwargs: dict = {}
    if layout == "segments":
        inp, labels = inp.view(-1, vocab), labels.view(-1)
        kwargs = {"segment_ids": torch.arange(n_seq).repeat_interleave(seq_len), "num_segments": n_seq}
    logits_storage = inp.untyped_storage().data_ptr()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_logprobs(inp, labels, backend=backend, average=True, **kwargs, **_small(backend))
    extra = [t for t in saved if t.untyped_storage().data_ptr() != logits_storage]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    n_tokens = n_seq * seq_len
    assert any(t.untyped_storage().data_ptr() == logits_storage for t in saved)  # logits by reference
    assert all(t.numel() <= n_tokens for t in extra), [tuple(t.shape) for t in extra]
    assert extra_bytes <= 24 * n_tokens, extra_bytes  # lse fp32 + labels int64 + segment ids/counts
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_same_grads_and_clobbers_logits(backend: str, dtype: torch.dtype) -> None:
    logits, labels = _case((3, 5), 1100, dtype, seed=15)
    grad_out = torch.randn(3, generator=torch.Generator().manual_seed(16))
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        inp = x.clone()  # non-leaf logits buffer that the backward may overwrite
        sequence_logprobs(inp, labels, inplace_backward=inplace, backend=backend, **_small(backend)).backward(grad_out)
        grads.append(x.grad)
        if inplace:
            assert torch.equal(inp.detach(), x.grad)  # the buffer now holds the gradient
    assert torch.equal(grads[0], grads[1])


def test_inplace_backward_refuses_leaf() -> None:
    logits, labels = _case((2, 3), 50, torch.float32, seed=17)
    with pytest.raises(ValueError, match="inplace_backward"):
        sequence_logprobs(logits.requires_grad_(), labels, inplace_backward=True, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_identical_reruns(backend: str) -> None:
    logits, labels = _case((24,), 1100, torch.bfloat16, seed=18, masked_rows=3)
    ids = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(19))
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        out = sequence_logprobs(x, labels, segment_ids=ids, num_segments=5, backend=backend, **_small(backend))
        out.backward(torch.linspace(-1.0, 2.0, 5))
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_backends_agree() -> None:
    logits, labels = _case((3, 6), 1300, torch.float32, seed=20)
    outs = [sequence_logprobs(logits, labels, backend=b, **_small(b)) for b in BACKENDS]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-5)


def test_all_negative_and_masked_vocabulary_logits() -> None:
    # Max identity must be -inf, not 0: logits far below zero are normal. A whole -inf block (a masked vocabulary
    # range) must not produce NaN in the streaming log-sum-exp.
    logits, labels = _case((2, 4), 700, torch.float32, seed=21, masked_rows=0)
    logits = logits - 1e4
    logits[..., :300] = float("-inf")
    labels = torch.where(labels == IGNORE, IGNORE, labels.clamp(min=300))
    ref = naive_sequence_logprobs(logits.double(), labels)
    for backend in BACKENDS:
        x = logits.clone().requires_grad_()
        out = sequence_logprobs(x, labels, backend=backend, **_small(backend))
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-2)  # fp32 logits ~1e4: ulp ~1e-3
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[..., :300]) == 0


def test_bad_inputs_raise_before_launch() -> None:
    logits, labels = _case((2, 3), 40, torch.float32, seed=22, masked_rows=0)
    bad = labels.clone()
    bad[1, 2] = 40
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 40"):
        sequence_logprobs(logits, bad)
    bad[1, 2] = -7
    with pytest.raises(ValueError, match="= -7"):
        token_logprobs(logits, bad)
    with pytest.raises(TypeError, match="logits"):
        sequence_logprobs(logits.long(), labels)
    with pytest.raises(TypeError, match="labels"):
        sequence_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="empty batch"):
        sequence_logprobs(logits[:0], labels[:0])
    with pytest.raises(ValueError, match="one device"):
        sequence_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="labels must have the shape"):
        sequence_logprobs(logits, labels[:, :2])
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        sequence_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sequence_logprobs(logits, labels, segment_ids=torch.zeros(6, dtype=torch.long))
    flat, flat_labels = logits.view(6, 40), labels.view(6)
    with pytest.raises(ValueError, match=r"segment_ids\[4\] = 3"):
        sequence_logprobs(flat, flat_labels, segment_ids=torch.tensor([0, 1, 2, 0, 3, 1]), num_segments=3)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        sequence_logprobs(flat, flat_labels, segment_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        sequence_logprobs(logits, labels, backend="cuda")  # type: ignore[arg-type]
    if "triton" in BACKENDS:
        # float64 always takes the torch path, whatever backend says (issue 13)
        torch.testing.assert_close(
            sequence_logprobs(logits.double(), labels, backend="triton"),
            sequence_logprobs(logits.double(), labels, backend="torch"),
            rtol=0,
            atol=0,
        )
        with pytest.raises(ValueError, match="block_v"):
            sequence_logprobs(logits, labels, backend="triton", block_v=100)
    # validate=False skips the label scan but still computes the same result for valid labels.
    torch.testing.assert_close(
        sequence_logprobs(logits, labels, validate=False), naive_sequence_logprobs(logits, labels), rtol=0, atol=1e-5
    )
    # A custom ignore_index is honored (and -100 is then an out-of-range label).
    custom = labels.clamp(min=0)
    custom[0, 0] = 39
    out = sequence_logprobs(logits, custom, ignore_index=39)
    torch.testing.assert_close(out, naive_sequence_logprobs(logits, custom, ignore_index=39), rtol=0, atol=1e-5)
    custom[0, 1] = IGNORE
    with pytest.raises(ValueError, match="-100"):
        sequence_logprobs(logits, custom, ignore_index=39)


# ---------------------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU: marked gpu, run by `pytest -m gpu` (interpreter off; skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.gpu


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_v", [None, 1024])
def test_cuda_kernels_match_float64(dtype: torch.dtype, block_v: int | None) -> None:
    # Real vocabulary size (not a multiple of 4096), default and explicit block sizes.
    logits, labels = _case((4, 37), 32003, dtype, seed=30)
    logits, labels = logits.cuda(), labels.cuda()
    _check_against_float64(logits, labels, "triton", seed=31, tuning={"block_v": block_v})
    _check_against_float64(logits[:, :-1], labels[:, 1:], "triton", seed=32, tuning={"block_v": block_v})
    flat, flat_labels = logits.view(-1, logits.shape[-1]), labels.view(-1)
    ids = torch.randint(0, 9, flat_labels.shape, generator=torch.Generator().manual_seed(33)).cuda()
    _check_against_float64(
        flat, flat_labels, "triton", seed=34, tuning={"block_v": block_v}, segment_ids=ids, num_segments=10
    )


@needs_cuda
def test_cuda_inplace_and_determinism() -> None:
    logits, labels = _case((6, 50), 50257, torch.bfloat16, seed=35)
    logits, labels = logits.cuda(), labels.cuda()
    ids = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(36)).cuda()
    grad_out = torch.linspace(-1.0, 1.0, 7, device="cuda")
    results = []
    for inplace in (False, False, True):
        x = logits.view(-1, 50257).clone().requires_grad_()
        out = sequence_logprobs(
            x.clone(), labels.view(-1), segment_ids=ids, num_segments=7, inplace_backward=inplace, backend="triton"
        )
        out.backward(grad_out)
        results.append((out.detach(), x.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
