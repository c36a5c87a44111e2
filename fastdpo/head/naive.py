"""The naive fused-head reference: all ``[N, V]`` logits materialized, then ``log_softmax`` and a gather."""
from __future__ import annotations

import torch

from fastdpo._dispatch import Backend
from fastdpo._dtypes import accumulate_dtype
from fastdpo.head.checks import _check_inputs
from fastdpo.head.function import TokenStats
from fastdpo.head.gather import GatherContext, _enter, _gather_bias, _gather_weight
from fastdpo.head.plan import _legacy_tiles

__all__ = ["naive_linear_token_logprobs"]


def naive_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_log_sum_p2: bool = False,
    return_mean_logit: bool = False,
    return_argmax_hit: bool = False,
    token_tile: int | None = None,
    vocab_tile: int | None = None,
    validate: bool = True,
    backend: Backend = "auto",
    gather_context: GatherContext | None = None,
    keep_logits_bytes: int | None = None,
    chunk_size: int | tuple[int, int] | None = None,
) -> TokenStats:
    """Reference: materialize all logits in the input dtype (``hidden @ weight.T``), ``log_softmax`` in fp32 (fp64
    for fp64), gather. Same signature and outputs as :func:`linear_token_logprobs` (the tiles, ``backend`` and
    ``keep_logits_bytes`` are accepted and ignored; ``chunk_size`` warns as there). Memory ``O(N * V)``: baseline
    and test oracle only.
    """
    _legacy_tiles("naive_linear_token_logprobs", chunk_size, token_tile, vocab_tile)
    _check_inputs(hidden, weight, labels, bias, softcap, logit_scale, temperature, ignore_index, validate)
    with _enter(gather_context):
        w = _gather_weight(weight)
        b = _gather_bias(bias)
        logits = hidden @ w.t()
        if b is not None:
            logits = logits + b
    acc = accumulate_dtype(hidden.dtype)
    z = logits.to(acc)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int64)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    logp = torch.where(valid, logp, zero)
    entropy = log_sum_p2 = mean_logit = hit = None
    with torch.no_grad():
        if return_entropy:  # p log p = 0 at a -inf logit (masked vocabulary); NaN stays NaN
            plogp = torch.where(logsm == float("-inf"), 0.0, logsm.exp() * logsm)
            entropy = torch.where(valid, -plogp.sum(-1), zero)
        if return_log_sum_p2:
            log_sum_p2 = torch.where(valid, torch.logsumexp(2.0 * logsm, dim=-1), zero)
        if return_mean_logit:
            mean_logit = torch.where(valid, z.mean(-1), zero)
        if return_argmax_hit:
            hit = (z.argmax(-1) == labels) & valid
    return TokenStats(logp, entropy, log_sum_p2, mean_logit, hit)
