"""Deterministic, differentiable segment sums: ``out[s] = sum of values[i] with segment_ids[i] == s``.

Used to reduce per-token log-probabilities to per-sequence ones in packed layouts. No atomics anywhere: element
indices are stable-sorted by segment and each segment's run is summed in a fixed order (Triton kernel
``fastdpo.kernels.segment_sum`` on CUDA, ``torch.segment_reduce`` on the torch path), so reruns are bit-identical.
The backward is a gather: ``grad_values[i] = grad_out[segment_ids[i]]``.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from fastdpo._dispatch import Backend, resolve_backend
from fastdpo._dtypes import accumulate_dtype
from fastdpo._launch import KernelLaunch, launch
from fastdpo._validation import check_float, check_index, check_same_device


def check_segments(segment_ids: torch.Tensor, n: int, num_segments: int | None, *, validate: bool) -> int:
    """Validate ``segment_ids`` (``[n]`` integers) and return the number of segments ``S``.

    ``num_segments=None`` means ``max(segment_ids) + 1`` (one device sync); an inferred count larger than ``n`` (a
    stray huge id would size every ``[S]`` output by it) is refused: pass ``num_segments`` explicitly then. With
    ``validate=True`` every id must lie in ``[0, S)`` (``ValueError`` naming the first bad value otherwise); with
    ``validate=False`` the ops ignore elements whose id lies outside (they add to no segment).
    """
    check_index("segment_ids", segment_ids)
    if segment_ids.dim() != 1 or segment_ids.shape[0] != n:
        raise ValueError(f"segment_ids must have shape [{n}], got {list(segment_ids.shape)}")
    if num_segments is None:
        if n == 0:
            raise ValueError("num_segments is required when there are no elements")
        inferred = int(segment_ids.max()) + 1
        if inferred > n:
            raise ValueError(
                f"num_segments=None would infer max(segment_ids) + 1 = {inferred} segments from {n} elements; pass "
                "num_segments explicitly (or check segment_ids for a stray id)"
            )
        num_segments = inferred
    if isinstance(num_segments, bool):
        raise TypeError("num_segments must be an int, got bool")
    try:
        num_segments = operator.index(num_segments)  # int, numpy or 0-dim integer tensor
    except TypeError:
        raise TypeError(f"num_segments must be an int, got {type(num_segments).__name__}") from None
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if validate and n:
        bad = (segment_ids < 0) | (segment_ids >= num_segments)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"segment_ids[{i}] = {int(segment_ids[i])} is out of range: segment ids must be in "
                f"[0, {num_segments}) (num_segments={num_segments})"
            )
    return num_segments


class _Runs(NamedTuple):
    """Elements grouped by segment, over the ids actually present (``U <= N`` runs; memory ``O(N)``, never ``O(S)``).

    ``order`` ``[N]`` element indices stable-sorted by id; run ``k`` is ``order[offsets[k]:offsets[k+1]]`` and holds
    the ``counts[k]`` elements of segment ``ids[k]`` (ascending; may lie outside ``[0, S)`` when unvalidated).
    """

    order: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def _runs(segment_ids: torch.Tensor) -> _Runs:
    sorted_ids, order = torch.sort(segment_ids.to(torch.int64), stable=True)
    ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.zeros(ids.shape[0] + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return _Runs(order, ids, counts, offsets)


def _spread(ids: torch.Tensor, per_run: torch.Tensor, num_segments: int, in_range: bool) -> torch.Tensor:
    """``[S]`` zeros with ``per_run[k]`` at ``ids[k]`` (distinct ids: deterministic); ids outside ``[0, S)`` are
    dropped unless the caller has checked them (``in_range``)."""
    if not in_range:
        keep = (ids >= 0) & (ids < num_segments)
        ids, per_run = ids[keep], per_run[keep]
    return per_run.new_zeros(num_segments).index_copy_(0, ids, per_run)


def segment_counts(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[S]`` int64 element count per segment; ids outside ``[0, S)`` are not counted. Memory ``O(N + S)``."""
    runs = _runs(segment_ids)
    return _spread(runs.ids, runs.counts, num_segments, in_range=False)


def segment_layout(segment_ids: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(order [N] int64, counts [S] int64, offsets [S+1] int64)``, the CSR layout over all ``S`` segments.

    ``order`` lists element indices stable-sorted by segment; segment ``s`` is ``order[offsets[s]:offsets[s+1]]``.
    Ids must lie in ``[0, num_segments)``.
    """
    runs = _runs(segment_ids)
    counts = _spread(runs.ids, runs.counts, num_segments, in_range=True)
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=segment_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return runs.order, counts, offsets


def _segment_sum_launch(
    values: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, block: int
) -> KernelLaunch:
    """The segment-sum kernel's launch: one program per segment (``offsets [S+1]``), writing ``out [S]`` fp32."""
    from fastdpo.kernels.segment_sum import segment_sum_kernel

    num_segments = offsets.shape[0] - 1
    return KernelLaunch(
        segment_sum_kernel, (num_segments,), (values, order, offsets, out), {"BLOCK": block}, 4, values.device
    )


def _segment_sum_triton(values: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(offsets.shape[0] - 1, dtype=torch.float32, device=values.device)
    launch(_segment_sum_launch(values, order, offsets, out, block))
    return out


def _segment_sum_torch(values: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # segment_reduce sums each run sequentially (one loop per segment): deterministic on CPU and CUDA. A sequential
    # fp32 sum of thousands of log-probs loses ~5x the accuracy of a pairwise sum, so accumulate in fp64 (O(N) work).
    sums = torch.segment_reduce(values.index_select(0, order).to(torch.float64), "sum", lengths=counts, unsafe=True)
    return sums.to(accumulate_dtype(values.dtype))


class _SegmentSum(torch.autograd.Function):
    """Forward sums the runs of the ids present (``O(N)`` work and memory besides the ``[S]`` output); backward is a
    gather, itself differentiable (double backward works), and gives 0 to elements with an id outside ``[0, S)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        values: torch.Tensor,
        segment_ids: torch.Tensor,
        num_segments: int,
        backend: str,
        block: int,
        ids_checked: bool,
    ) -> torch.Tensor:
        runs = _runs(segment_ids)
        if runs.ids.numel() == 0:
            out = values.new_zeros(num_segments, dtype=accumulate_dtype(values.dtype))
        else:
            if backend == "triton":
                per_run = _segment_sum_triton(values.contiguous(), runs.order, runs.offsets, block)
            else:
                per_run = _segment_sum_torch(values, runs.order, runs.counts)
            out = _spread(runs.ids, per_run, num_segments, in_range=ids_checked)
        ctx.save_for_backward(segment_ids)
        ctx.values_dtype = values.dtype
        ctx.ids_checked = ids_checked
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        (segment_ids,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[0]:
            ids = segment_ids.to(torch.int64)
            if ctx.ids_checked:
                grad_values = grad_out.index_select(0, ids)
            else:
                inside = (ids >= 0) & (ids < grad_out.shape[0])
                grad_values = grad_out.index_select(0, torch.where(inside, ids, 0))
                grad_values = torch.where(inside, grad_values, 0.0)
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_values, None, None, None, None, None


def segment_sum(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int | None = None,
    *,
    validate: bool = True,
    backend: Backend = "auto",
    block: int = 128,
) -> torch.Tensor:
    """Sum ``values`` per segment, deterministically.

    Args:
        values: ``[N]`` float16/bfloat16/float32/float64.
        segment_ids: ``[N]`` integer ids in ``[0, num_segments)``, any order.
        num_segments: ``S``; ``None`` means ``max(segment_ids) + 1`` (a device sync), refused when that exceeds
            ``N`` (a stray id; pass ``S`` explicitly).
        validate: check that every id lies in ``[0, S)`` (a device sync); ``False`` skips that check for hot loops,
            and an element whose id lies outside then adds to no segment and gets gradient 0.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``; float64 values always use the torch path
            (whatever ``backend`` says: the kernel sums in fp32).
        block: elements per Triton loop step.

    Returns:
        ``[S]`` float32 (float64 for float64 values); empty segments give 0. Differentiable wrt ``values`` (twice:
        the backward is a gather). Work and scratch memory are ``O(N)`` besides the ``[S]`` output.
    """
    check_float("values", values)
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [N], got shape {list(values.shape)}")
    check_index("segment_ids", segment_ids)
    check_same_device(values=values, segment_ids=segment_ids)
    num_segments = check_segments(segment_ids, values.shape[0], num_segments, validate=validate)
    chosen = resolve_backend(backend, values.device)
    if values.dtype == torch.float64:  # the kernel sums in fp32
        chosen = "torch"
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return _SegmentSum.apply(values, segment_ids, num_segments, chosen, block, validate)


def pair_groups(num_pairs: int) -> list[torch.Tensor]:
    """The segment ids of each preference pair, ``[tensor([i, P + i]) for i in range(P)]``: the chosen sequence of
    pair ``i`` is segment ``i``, its rejected one ``P + i``. These are the loss-local groups of
    :func:`fastdpo.head.linear_logprobs_loss_grad_in_forward` for pair-local losses, which reads them as
    host integers: they are built on the CPU (no device round trip per group)."""
    ar = torch.arange(num_pairs, dtype=torch.int64, device="cpu")
    return list(torch.stack([ar, ar + num_pairs], dim=1))
