"""The fused LM head: token / sequence log-probabilities straight from hidden states, never materializing
``[N, V]`` logits.

Modules, bottom up: :mod:`~fastdpo.head.plan` (logit transform, tile shape, budgets), :mod:`~fastdpo.head.checks`
(input checks), :mod:`~fastdpo.head.gather` (FSDP2 / ZeRO-3 weights), :mod:`~fastdpo.head.options` (the call
options, checked once), :mod:`~fastdpo.head.tiles` (one tile: project, fold, logit gradient),
:mod:`~fastdpo.head.sweeps` (the forward and backward sweeps over the tile grid), :mod:`~fastdpo.head.function`
(the autograd Function and the public ``linear_*`` functions), :mod:`~fastdpo.head.grad_in_forward` (pair-local
losses with the head's gradients formed in the forward). The materializing reference
(``naive_linear_token_logprobs``) is in :mod:`fastdpo.reference`.
"""

from fastdpo.head.function import TokenStats, linear_sequence_logprobs, linear_token_logprobs
from fastdpo.head.grad_in_forward import SegmentStats, linear_logprobs_loss_grad_in_forward
from fastdpo.head.plan import DEFAULT_GIF_LOGITS_BYTES, DEFAULT_KEEP_LOGITS_BYTES

__all__ = [
    "DEFAULT_GIF_LOGITS_BYTES",
    "DEFAULT_KEEP_LOGITS_BYTES",
    "SegmentStats",
    "TokenStats",
    "linear_logprobs_loss_grad_in_forward",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
]
