"""Naive reference implementations: the oracles of the tests, the baselines of the benchmarks and the ``naive``
variant of ``fastdpo memory --measure``.

Every function here materializes what the fast paths never do -- the full ``[N, V]`` logits and their log-softmax --
and is written the way a plain PyTorch training loop writes it:

* :func:`naive_token_logprobs`: ``log_softmax(logits)[label]`` in the logits' dtype, 0 where ``label ==
  ignore_index``; :func:`naive_sequence_logprobs` sums (or averages) it per row or per segment.
* :func:`naive_linear_token_logprobs`: ``logits = hidden @ weight.T (+ bias)`` in the input dtype, the transforms
  (``logit_scale``, ``softcap``, ``temperature``) and ``log_softmax`` in fp32 (fp64 for fp64 inputs), gather.
* :func:`naive_batch_logps`: a causal LM's full forward on a :class:`fastdpo.PreferenceCollator` batch, its logits
  gathered at the batch's scored positions (``logp_index`` / ``logp_labels``) and summed per sequence
  (``logp_seq``): ``[2P]``, chosen ``0..P-1`` then rejected ``P..2P-1``.
* :func:`naive_completion_logps`: one sequence's completion log-prob from its own forward, alone (no batch layout).
* :func:`naive_dpo_loss`: the sigmoid DPO loss ``-mean log sigmoid(beta * ((pc - rc) - (pr - rr)))`` (LOSSES.md).

A float64 reference is the same function on float64 inputs (``logits.double()``, ``model.double()``). The numeric
rule of the tests and benchmarks (:func:`assert_within_naive`): the fast path's error against float64 must not exceed
the naive path's error in the same dtype plus :func:`tolerance` of that dtype (relative to the reference's scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fastdpo._dtypes import accumulate_dtype
from fastdpo._validation import check_float, check_index, check_same_device

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.head import TokenStats
    from fastdpo.head.options import TokenStatsKeywords

__all__ = [
    "FP32_SLACK",
    "assert_within_naive",
    "naive_batch_logps",
    "naive_completion_logps",
    "naive_dpo_loss",
    "naive_linear_token_logprobs",
    "naive_sequence_logprobs",
    "naive_token_logprobs",
    "tolerance",
]

#: The slack of the error-budget rule for fp32 accumulation: about 2^4 unit roundoffs of fp32 at the reference's scale.
FP32_SLACK = 2e-6


def tolerance(dtype: torch.dtype) -> float:
    """Relative slack of a ``dtype`` result in the error-budget rule (:func:`assert_within_naive`): fp32
    accumulation (:data:`FP32_SLACK`) plus, for half precision (bf16 and fp16: the kernels accept both and
    accumulate in fp32), the unit roundoff ``eps / 2`` of the one final rounding to the output dtype.
    ``ValueError`` for a non-float dtype."""
    if not dtype.is_floating_point:
        raise ValueError(f"tolerance: {dtype} is not a floating dtype")
    unit_roundoff = torch.finfo(dtype).eps / 2 if dtype in (torch.bfloat16, torch.float16) else 0.0
    return FP32_SLACK + unit_roundoff


def assert_within_naive(name: str, got: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor) -> None:
    """The numeric rule of the tests and benchmarks: ``max|got - ref| <= max|naive - ref| + tolerance(got.dtype) *
    max|ref|``, where ``ref`` is the float64 reference and ``naive`` the naive path in ``got``'s dtype.
    ``AssertionError`` naming ``name`` and both errors otherwise (or when the shapes differ)."""
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    ref = ref.detach().double().cpu()
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((got.detach().double().cpu() - ref).abs().max())
    naive_err = float((naive.detach().double().cpu() - ref).abs().max())
    bound = naive_err + tolerance(got.dtype) * scale
    assert err <= bound, f"{name}: error {err:.3e} > naive same-dtype error {naive_err:.3e} + tol (scale {scale:.3e})"


def naive_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """``log_softmax(logits, -1)[..., label]`` in the logits' dtype, 0 where ``labels == ignore_index``.

    ``logits [..., V]`` float, ``labels [...]`` integer (``ignore_index`` or in ``[0, V)``) -> ``[...]`` in the
    logits' dtype, differentiable wrt ``logits``. Masked with ``where``, not a product: a ``-inf`` logit at index 0
    (a masked vocabulary entry) must not turn an ignored position into NaN.
    """
    valid = labels != ignore_index
    logps = torch.log_softmax(logits, dim=-1)
    tok = logps.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))


def naive_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Reference of :func:`fastdpo.sequence_logprobs`: :func:`naive_token_logprobs` (``log_softmax`` in the logits'
    dtype) summed in fp32 (fp64 for fp64 logits).

    Layouts as :func:`fastdpo.sequence_logprobs`: ``logits [B, T, V]``, ``labels [B, T]`` -> ``[B]``; or packed
    ``logits [N, V]``, ``labels [N]``, ``segment_ids [N]`` -> ``[num_segments]`` (default ``max(segment_ids) + 1``).
    ``average`` divides by the number of scored tokens (at least 1).
    """
    check_float("logits", logits)
    check_index("labels", labels)
    check_same_device(logits=logits, labels=labels, segment_ids=segment_ids)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {list(labels.shape)} does not match logits {list(logits.shape)}")
    acc = accumulate_dtype(logits.dtype)
    valid = labels != ignore_index
    tok = naive_token_logprobs(logits, labels, ignore_index=ignore_index).to(acc)
    if segment_ids is None:
        out = tok.sum(dim=-1)
        counts = valid.sum(dim=-1)
    else:
        ids = segment_ids.long()
        if num_segments is None:
            num_segments = int(ids.max()) + 1
        out = torch.zeros(num_segments, dtype=acc, device=logits.device).index_add(0, ids, tok)
        counts = torch.zeros(num_segments, dtype=torch.int64, device=logits.device).index_add(0, ids, valid.long())
    if average:
        out = out / counts.clamp(min=1).to(acc)
    return out


def naive_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **keywords: Unpack[TokenStatsKeywords],
) -> TokenStats:
    """Reference: materialize all logits in the input dtype (``hidden @ weight.T``), ``log_softmax`` in fp32 (fp64
    for fp64), gather. Same arguments and outputs as :func:`fastdpo.head.linear_token_logprobs`: ``keywords`` are its
    keywords after ``bias``, checked the same way (the tiles, ``backend`` and ``keep_logits_bytes`` are accepted and
    ignored; ``chunk_size`` warns as there; any other keyword is a ``TypeError``). Memory ``O(N * V)``: baseline and
    test oracle only.
    """
    from fastdpo.head.checks import _check_inputs
    from fastdpo.head.function import TokenStats
    from fastdpo.head.gather import _enter, _gather_bias, _gather_weight
    from fastdpo.head.options import head_keywords

    options, returns = head_keywords("naive_linear_token_logprobs", keywords, returns=True)
    _check_inputs(hidden, weight, labels, bias, options)
    with _enter(options.gather_context):
        w = _gather_weight(weight)
        b = _gather_bias(bias)
        logits = hidden @ w.t()
        if b is not None:
            logits = logits + b
    acc = accumulate_dtype(hidden.dtype)
    z = logits.to(acc)
    if options.logit_scale != 1.0:
        z = z * options.logit_scale
    if options.softcap is not None:
        z = torch.tanh(z / options.softcap) * options.softcap
    if options.temperature != 1.0:
        z = z / options.temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != options.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int64)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    logp = torch.where(valid, logp, zero)
    entropy = log_sum_p2 = mean_logit = hit = None
    with torch.no_grad():
        if returns.entropy:  # p log p = 0 at a -inf logit (masked vocabulary); NaN stays NaN
            plogp = torch.where(logsm == float("-inf"), 0.0, logsm.exp() * logsm)
            entropy = torch.where(valid, -plogp.sum(-1), zero)
        if returns.log_sum_p2:
            log_sum_p2 = torch.where(valid, torch.logsumexp(2.0 * logsm, dim=-1), zero)
        if returns.mean_logit:
            mean_logit = torch.where(valid, z.mean(-1), zero)
        if returns.argmax_hit:
            hit = (z.argmax(-1) == labels) & valid
    return TokenStats(logp, entropy, log_sum_p2, mean_logit, hit)


def naive_batch_logps(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    attn_kwargs: Mapping[str, Any] | None = None,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[2P]`` per-sequence log-probs of a :class:`fastdpo.PreferenceCollator` batch (any packing) from the model's
    full logits: ``log_softmax`` over ``[R·L, V]`` (in ``logits_dtype`` if given, else the model's), gathered at
    ``logp_index`` / ``logp_labels``, summed by ``logp_seq`` in fp32 (fp64 when the log-probs are fp64); on the CPU.

    ``attn_kwargs`` default to :func:`fastdpo.attention.build_attention_kwargs` of the batch (mask, position ids).
    Differentiable; wrap in ``torch.no_grad()`` for a reference pass, in ``torch.autocast`` for autocast logits.
    """
    if attn_kwargs is None:
        from fastdpo.attention import build_attention_kwargs

        attn_kwargs = build_attention_kwargs(batch, model)
    logits = model(input_ids=batch["input_ids"], **attn_kwargs).logits.flatten(0, 1)
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)
    picked = torch.log_softmax(logits, dim=-1)[batch["logp_index"], batch["logp_labels"]]
    acc = accumulate_dtype(picked.dtype)
    out = torch.zeros(2 * int(batch["num_pairs"]), dtype=acc, device=picked.device)
    return out.index_add(0, batch["logp_seq"], picked.to(acc)).cpu()


def naive_completion_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """The summed log-probs of ``completion`` after ``prompt`` from the model's full logits on this one sequence
    alone (no padding, no packing, no mask; ``log_softmax`` in float64), without gradient. A completion token at
    position 0 has no predictor and is skipped (TRL's ``mask[:, 1:]``)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(completion)], device=device)
    first = max(len(prompt), 1)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, first - 1 : -1].double().log_softmax(-1)
    return float(logp.gather(-1, ids[0, first:, None]).sum())


def naive_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO loss of ``[2P]`` sequence log-probs (chosen ``0..P-1``, rejected ``P..2P-1``):
    ``-mean log sigmoid(beta * ((pc - rc) - (pr - rr)))``, a scalar in the inputs' dtype."""
    p = policy_logps.shape[0] // 2
    margin = (policy_logps[:p] - ref_logps[:p]) - (policy_logps[p:] - ref_logps[p:])
    return -F.logsigmoid(beta * margin).mean()
