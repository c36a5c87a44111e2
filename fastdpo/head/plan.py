"""Tiling plan of the fused LM head: the logit transform and tile shape of one call, and the memory budgets.

A call is described by a :class:`_Spec`: the transform ``z = softcap * tanh(scale * x / softcap) / temperature``
(``z = scale * x / temperature`` without a softcap) and the tile shape ``(token_chunk, vocab_chunk)`` that
:func:`_plan` picks, both fixed for the whole call. Every tile is ``token_chunk x vocab_chunk`` fp32 (fp64 for fp64
inputs) except the last row/column of tiles; the budgets bound what is kept between the forward and backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastdpo._dispatch import Backend, resolve_backend

#: Raw logits kept from the forward for the backward (skips that part of the recompute GEMM). Bounded, so the
#: saved state stays O(N) + this constant.
DEFAULT_KEEP_LOGITS_BYTES = 176 * 2**20
#: Logits buffer of one chunk of groups in grad-in-forward mode (the whole chunk's logits stay between the two passes).
DEFAULT_GIF_LOGITS_BYTES = 256 * 2**20


class _Spec(NamedTuple):
    """Logit transform and tiling of one call."""

    scale: float
    softcap: float | None
    temperature: float
    token_chunk: int
    vocab_chunk: int
    backend: str

    @property
    def has_transform(self) -> bool:
        return self.scale != 1.0 or self.softcap is not None or self.temperature != 1.0

    def kernel_consts(self) -> tuple[float, float, float]:
        """``(scale, inv_softcap, out_mult)`` as the Triton kernels take them."""
        if self.softcap is not None:
            return self.scale, 1.0 / self.softcap, self.softcap / self.temperature
        return self.scale, 1.0, 1.0 / self.temperature



def _plan(
    n: int, vocab: int, device: torch.device, chunk_size: int | tuple[int, int] | None, backend: str
) -> tuple[int, int]:
    """Tile shape ``(tokens, vocab)``.

    CPU: the whole token set (up to 4096 rows) against ~16 MB of vocabulary columns per tile. GPU: big tiles (up to 8192 x 8192, at most
    ~256 MB of fp32) so each GEMM saturates the device.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
            tok, voc = None, chunk_size
        elif (
            isinstance(chunk_size, tuple)
            and len(chunk_size) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) for c in chunk_size)
        ):
            tok, voc = chunk_size
        else:
            raise TypeError(f"chunk_size must be an int (vocab tile) or a (tokens, vocab) tuple, got {chunk_size!r}")
        if voc < 1 or (tok is not None and tok < 1):
            raise ValueError(f"chunk_size entries must be >= 1, got {chunk_size!r}")
        tok = tok if tok is not None else _default_token_chunk(device)
        return max(1, min(tok, max(n, 1))), min(voc, vocab)
    tok = min(max(n, 1), _default_token_chunk(device))
    if device.type == "cuda":
        voc = max(1024, min(8192, (64 * 2**20) // max(tok, 1)))
    else:
        # ~16 MB fp32 tiles: few, large element-wise ops (each one is a parallel region; on a shared 2-core CPU
        # per-op synchronisation dominates small tiles) while the GEMMs keep full efficiency.
        voc = max(256, min(4096, (4 * 2**20) // max(tok, 1) // 256 * 256))
    return tok, min(voc, vocab)


def _default_token_chunk(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 4096


def _resolve(backend: Backend, hidden: torch.Tensor) -> str:
    """Concrete backend; float64 always takes the torch path (the kernels fold in fp32)."""
    resolved = resolve_backend(backend, hidden.device)
    return "torch" if hidden.dtype == torch.float64 else resolved
