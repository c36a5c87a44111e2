"""Triton kernel: deterministic segment sums (no atomics).

``out[s] = sum_{i : segment_ids[i] == s} values[i]`` in fp32. The caller stable-sorts the element indices by segment
(``order``) and passes the CSR offsets of each segment in that order (``offsets[s] .. offsets[s + 1]``); one program
per segment then sums its contiguous run in a fixed order, so reruns are bit-identical (unlike ``index_add_`` /
atomics on a GPU). Empty segments give 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [N] float (read through ``order``)
    order_ptr,  # [N] int64: element indices stable-sorted by segment
    offsets_ptr,  # [S + 1] int64: segment s is order[offsets[s]:offsets[s + 1]]
    out_ptr,  # out: [S] float32
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)  # BLOCK partial sums, combined once at the end
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        mask = idx < end
        src = tl.load(order_ptr + idx, mask=mask, other=0)
        acc += tl.load(values_ptr + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))
