"""Tiling plan of the fused LM head: the logit transform and tile shape of one call, and the memory budgets.

A call is described by a :class:`_Spec`: the transform ``z = softcap * tanh(scale * x / softcap) / temperature``
(``z = scale * x / temperature`` without a softcap) and the tile shape ``(token_chunk, vocab_chunk)`` that
:func:`_plan` picks, both fixed for the whole call. Every tile is ``token_chunk x vocab_chunk`` fp32 (fp64 for fp64
inputs) except the last row/column of tiles; the budgets bound what is kept between the forward and backward.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

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
    n: int, vocab: int, device: torch.device, *, token_tile: int | None = None, vocab_tile: int | None = None
) -> tuple[int, int]:
    """Tile shape ``(tokens, vocab)`` for ``n`` labelled tokens and a vocabulary of ``vocab``.

    ``token_tile`` / ``vocab_tile`` (checked by :func:`_check_tiles`) fix a side; ``None`` picks it from the shapes
    and device. CPU: the whole token set (up to 4096 rows) against ~16 MB of fp32 vocabulary columns per tile (few,
    large element-wise ops while the GEMMs keep full efficiency). GPU: big tiles (up to 8192 x 8192, at most
    ~256 MB of fp32) so each GEMM saturates the device.
    """
    tok = min(max(n, 1), token_tile if token_tile is not None else _default_token_chunk(device))
    if vocab_tile is not None:
        voc = vocab_tile
    elif device.type == "cuda":
        voc = max(1024, min(8192, (64 * 2**20) // max(tok, 1)))
    else:
        voc = max(256, min(4096, (4 * 2**20) // max(tok, 1) // 256 * 256))
    return tok, min(voc, vocab)


def _check_tiles(token_tile: int | None, vocab_tile: int | None) -> None:
    """``TypeError`` / ``ValueError`` unless each tile side is ``None`` or an int >= 1."""
    for name, value in (("token_tile", token_tile), ("vocab_tile", vocab_tile)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")


def _check_keep_bytes(value: int | None) -> None:
    """``ValueError`` unless the logits byte budget ``keep_logits_bytes`` is ``None`` or an int >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"keep_logits_bytes must be an int >= 0, got {value!r}")


def _legacy_tiles(
    where: str,
    chunk_size: Any,
    token_tile: int | None,
    vocab_tile: int | None,
    *,
    old: str = "chunk_size",
    stacklevel: int = 3,
) -> tuple[int | None, int | None]:
    """``(token_tile, vocab_tile)`` for a call that may still pass the deprecated ``chunk_size`` (named ``old`` at
    the call: an int is the vocabulary tile, a ``(tokens, vocab)`` tuple both), with a ``DeprecationWarning``;
    together with a tile keyword it is a ``TypeError``. Checks the tiles (:func:`_check_tiles`)."""
    if chunk_size is None:
        _check_tiles(token_tile, vocab_tile)
        return token_tile, vocab_tile
    if token_tile is not None or vocab_tile is not None:
        raise TypeError(f"{where}: {old} is the deprecated spelling of token_tile / vocab_tile; pass those only")
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        tok, voc = None, chunk_size
    elif (
        isinstance(chunk_size, tuple)
        and len(chunk_size) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) for c in chunk_size)
    ):
        tok, voc = chunk_size
    else:
        raise TypeError(f"{old} must be an int (vocab tile) or a (tokens, vocab) tuple, got {chunk_size!r}")
    if voc < 1 or (tok is not None and tok < 1):
        raise ValueError(f"{old} entries must be >= 1, got {chunk_size!r}")
    warnings.warn(
        f"{where}: {old}= is deprecated, use vocab_tile= (and token_tile= for a (tokens, vocab) tuple)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return tok, voc


def _default_token_chunk(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 4096


def _resolve(backend: Backend, hidden: torch.Tensor) -> str:
    """Concrete backend; float64 always takes the torch path (the kernels fold in fp32)."""
    resolved = resolve_backend(backend, hidden.device)
    return "torch" if hidden.dtype == torch.float64 else resolved
