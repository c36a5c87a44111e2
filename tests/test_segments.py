"""Deterministic segment sums (``fastdpo.segments``): values, gradient, determinism, validation.

The Triton kernel runs through the interpreter on CPU (``backend="triton"``; conftest sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo.segments import segment_layout, segment_sum

# Triton on CPU tensors needs the interpreter (conftest sets it except under `pytest -m gpu`).
BACKENDS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]


def _ids_with_gaps(n: int, num_segments: int, gen: torch.Generator) -> torch.Tensor:
    """Random unsorted ids in [0, num_segments) that leave segment 1 and the last segment empty."""
    allowed = torch.tensor([s for s in range(num_segments) if s not in (1, num_segments - 1)])
    return allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]


def _reference(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Float64 per-segment sums by an explicit loop (independent of the code under test)."""
    out = torch.zeros(num_segments, dtype=torch.float64)
    for s in range(num_segments):
        out[s] = values.double()[ids == s].sum()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_segment_sum_matches_float64(backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    n, num_segments = 301, 9
    values = (torch.randn(n, generator=gen) * 5).to(dtype)
    ids = _ids_with_gaps(n, num_segments, gen)
    out = segment_sum(values, ids, num_segments, backend=backend, block=16)
    assert out.dtype == torch.float32 and out.shape == (num_segments,)
    ref = _reference(values, ids, num_segments)
    # Naive float32 scatter-add in the same input dtype: the error budget.
    naive = torch.zeros(num_segments).index_add(0, ids, values.float())
    err, naive_err = (out.double() - ref).abs().max(), (naive.double() - ref).abs().max()
    assert err <= naive_err + 1e-5 * ref.abs().max(), (err, naive_err)
    assert out[1] == 0 and out[-1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_default_num_segments_and_sorted_layout(backend: str) -> None:
    gen = torch.Generator().manual_seed(3)
    ids = torch.sort(torch.randint(0, 5, (40,), generator=gen)).values
    values = torch.randn(40, generator=gen)
    out = segment_sum(values, ids, backend=backend)
    assert out.shape == (int(ids.max()) + 1,)
    torch.testing.assert_close(out.double(), _reference(values, ids, out.shape[0]), rtol=0, atol=1e-5)


def test_segment_layout_is_stable_csr() -> None:
    ids = torch.tensor([2, 0, 2, 0, 3, 2])
    order, counts, offsets = segment_layout(ids, 5)
    assert order.tolist() == [1, 3, 0, 2, 5, 4]  # stable: equal ids keep their input order
    assert counts.tolist() == [2, 0, 3, 1, 0]
    assert offsets.tolist() == [0, 2, 2, 5, 6, 6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_is_bit_identical_across_runs(backend: str) -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(257, generator=gen) * 100
    ids = torch.randint(0, 7, (257,), generator=gen)
    first = segment_sum(values, ids, 7, backend=backend, block=16)
    for _ in range(2):
        assert torch.equal(segment_sum(values, ids, 7, backend=backend, block=16), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_backward_is_a_gather(backend: str) -> None:
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(50, generator=gen).requires_grad_()
    ids = torch.randint(0, 6, (50,), generator=gen)
    grad_out = torch.randn(6, generator=gen)
    segment_sum(values, ids, 6, backend=backend).backward(grad_out)
    assert torch.equal(values.grad, grad_out[ids])


def test_segment_sum_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 4, (13,), generator=gen)
    out = segment_sum(values, ids, 5, backend="torch")
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, ids, 5, backend="torch"), (values,))


def test_segment_sum_rejects_bad_input() -> None:
    values = torch.randn(6)
    ids = torch.tensor([0, 1, 2, 7, 1, 0])
    with pytest.raises(ValueError, match=r"segment_ids\[3\] = 7"):
        segment_sum(values, ids, 4)
    with pytest.raises(ValueError, match="= -1"):
        segment_sum(values, torch.tensor([0, 1, -1, 0, 1, 0]), 4)
    with pytest.raises(ValueError, match="num_segments must be >= 1"):
        segment_sum(values, torch.zeros(6, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="segment_ids"):
        segment_sum(values, torch.zeros(6), 2)
    with pytest.raises(TypeError, match="segment_ids"):
        segment_sum(values, [0, 1, 0, 1, 0, 1], 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_segments"):
        segment_sum(values, torch.zeros(6, dtype=torch.long), 2.0)  # type: ignore[arg-type]
    assert segment_sum(values, torch.zeros(6, dtype=torch.long), torch.tensor(3)).shape == (3,)
    with pytest.raises(TypeError, match="values"):
        segment_sum(torch.arange(6), torch.zeros(6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="shape"):
        segment_sum(values, torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="one device"):
        segment_sum(values, torch.zeros(6, dtype=torch.long, device="meta"), 2)
    if "triton" in BACKENDS:
        # float64 always takes the torch path, whatever backend says (issue 13)
        ids = torch.tensor([0, 1, 1, 0, 1, 1])
        torch.testing.assert_close(
            segment_sum(values.double(), ids, 2, backend="triton"),
            segment_sum(values.double(), ids, 2, backend="torch"),
            rtol=0,
            atol=0,
        )
    # validate=False skips the range check (the caller vouches for the ids).
    assert segment_sum(values, torch.zeros(6, dtype=torch.long), 1, validate=False).shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_of_no_elements_is_zero(backend: str) -> None:
    # A batch whose pairs have no completion token at all: every segment is empty.
    values = torch.zeros(0, requires_grad=True)
    out = segment_sum(values, torch.zeros(0, dtype=torch.long), 3, backend=backend)
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert values.grad is not None and values.grad.shape == (0,)


@pytest.mark.gpu
def test_cuda_segment_sum_deterministic_and_accurate() -> None:
    gen = torch.Generator().manual_seed(40)
    values = torch.randn(100_003, generator=gen) * 10
    ids = torch.randint(0, 37, (100_003,), generator=gen)
    out = segment_sum(values.cuda(), ids.cuda(), 40, backend="triton")
    assert torch.equal(out, segment_sum(values.cuda(), ids.cuda(), 40, backend="triton"))
    ref = torch.zeros(40, dtype=torch.float64).index_add(0, ids, values.double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-3)
