"""The old import path of the fused LM head, kept for users: the code lives in :mod:`fastdpo.head`.

Only the public names are re-exported here; import anything else from the :mod:`fastdpo.head` module that owns it.
"""
from fastdpo.head import (
    DEFAULT_KEEP_LOGITS_BYTES,
    SegmentStats,
    TokenStats,
    linear_logprobs_loss_grad_in_forward,
    linear_sequence_logprobs,
    linear_token_logprobs,
    naive_linear_token_logprobs,
)

__all__ = [
    "DEFAULT_KEEP_LOGITS_BYTES",
    "SegmentStats",
    "TokenStats",
    "linear_logprobs_loss_grad_in_forward",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "naive_linear_token_logprobs",
]
