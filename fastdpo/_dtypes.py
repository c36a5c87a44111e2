"""The accumulation dtype: the one precision rule shared by the log-prob, segment-sum, fused-head and loss code."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """``torch.float64`` for float64 inputs, else ``torch.float32``: the dtype that sums, logsumexps, GEMM outputs and
    loss arithmetic use for fp16 / bf16 / fp32 (and fp64) inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
