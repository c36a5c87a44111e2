"""Per-rank memory of a sequence-parallel DPO step (``fastdpo memory --sequence-parallel k``).

Each of the ``k`` ranks holds the full weights, optimizer state and reference (no parameter sharding is modelled), the
activations of its ``R · Ls`` columns (``Ls = ceil(L / k)``, the rows padded to ``Lp = k · Ls``) and runs the fused
head on the scored tokens whose predicting position it holds. What sequence parallelism does *not* divide by ``k``:

* the attention masks, built for the full ``Lp`` columns on every rank (prefix_shared rows; eager attention; the
  sliding-window types of SDPA models), and SDPA's per-layer additive copy of a mask (``R · Lp² · b``, saved);
* the head's work, which follows the completions: a rank whose columns are all prompt scores nothing, the last one
  usually most -- the peak rank is the one with the most scored tokens (:func:`owned_tokens`);
* one more ``b · q`` per token and layer than a single process saves: the ``o_proj`` input is the all-to-all's output,
  no longer a view of the attention output;
* the all-to-all buffers, transient inside one layer (a send and a receive buffer of ``q`` or ``k``/``v`` size).

Layout of the engine's step (what ``--measure`` runs,
:func:`fastdpo.benchmarks.memory_measure.measure_sequence_parallel`): ``packing="padding_free"`` is the collator's
``"pad"`` layout with equal-length rows (2 rows per pair, no padding, so no mask for SDPA: causal attention is exact),
the rows of :class:`fastdpo.memory.StepConfig`; ``"prefix_shared"`` is the collator's packed rows and mask.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["activation_bytes", "alltoall_bytes", "mask_bytes", "owned_tokens", "shard_length"]


def shard_length(step: Any) -> int:
    """``Ls = ceil(L / k)`` columns per rank."""
    return math.ceil(step.seq_len / step.sequence_parallel)


def _heads(m: Any, k: int) -> tuple[int, int]:
    """``(rep, groups)``: key/value replication factor before the all-to-all and query heads per key/value head
    after it (:func:`fastdpo.ulysses.ulysses_attention_forward`)."""
    rep = k // math.gcd(m.num_key_value_heads, k)
    return rep, m.num_attention_heads // (m.num_key_value_heads * rep)


def activation_bytes(m: Any, step: Any) -> int:
    """Bytes the policy backbone saves for backward on one rank (see :func:`fastdpo.memory.activation_bytes` for the
    per-token terms, here over the rank's ``T = R · Ls`` tokens, ``b`` the dtype's bytes):

    * SDPA: ``q``, ``k``/``v``, the output and the ``o_proj`` input (the all-to-all output): ``b·(3q + 2·kv') + 4·H``
      per token, ``kv' = rep · kv`` as exchanged (native GQA without a mask; with the prefix_shared mask transformers
      repeats k/v to every query head, ``kv' = q``, unless a rank holds a single key/value head: the repeat is then a
      view of it), plus with the mask its additive full-length copy per layer: ``R · Lp² · b``;
    * eager (Gemma 2): ``4·b·q`` per token and the rank's ``H / k`` heads of full-length scores: ``R · (H/k) · Lp²``
      times (``b`` soft-capped scores, fp32 softmax and its ``b`` copy);
    * rotary tables per row (the engine passes position ids): ``2 · R · Ls · head_dim · b``.
    """
    from fastdpo.memory import DTYPE_BYTES, norm_mlp_bytes

    k = step.sequence_parallel
    b = DTYPE_BYTES[step.dtype]
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    ls = shard_length(step)
    lp, rows = k * ls, step.rows
    tokens = rows * ls
    per_token, final_norm = norm_mlp_bytes(m, b)
    if m.eager_attention:
        per_token += 4 * b * q
        scores = rows * (m.num_attention_heads // k) * lp**2 * (b + 4 + (b if b != 4 else 0))
    else:
        rep, groups = _heads(m, k)
        kv_saved = rep * kv  # key/value heads as exchanged (native GQA without a mask)
        if step.packing == "prefix_shared" and groups > 1 and m.num_key_value_heads * rep > k:
            kv_saved = q  # masked: transformers repeats them to every query head (a view when a rank has one)
        per_token += b * (3 * q + 2 * kv_saved) + 4 * m.num_attention_heads
        scores = rows * lp**2 * b if step.packing == "prefix_shared" else 0
    rotary = 2 * rows * ls * m.head_dim * b
    return m.num_hidden_layers * (tokens * per_token + scores) + tokens * final_norm + rotary


def mask_bytes(m: Any, step: Any) -> int:
    """The full-length masks every rank builds (alive during the forwards): one ``[R, 1, Lp, Lp]`` per attention layer
    type for prefix_shared rows and for eager attention (bool for SDPA, ``b``-byte additive for eager); for SDPA with
    ``padding_free`` rows only the sliding-window types need one (full-attention layers run causal, no mask)."""
    from fastdpo.memory import DTYPE_BYTES

    lp = step.sequence_parallel * shard_length(step)
    per_mask = step.rows * lp**2 * (DTYPE_BYTES[step.dtype] if m.eager_attention else 1)
    if step.packing == "prefix_shared" or m.eager_attention:
        return m.attention_layer_types * per_mask
    return (m.attention_layer_types - 1) * per_mask


def alltoall_bytes(m: Any, step: Any) -> int:
    """Transient all-to-all buffers inside one layer: a send and a receive buffer of the largest exchanged tensor
    (``q``, or ``k``/``v`` after replication) over the rank's tokens."""
    from fastdpo.memory import DTYPE_BYTES

    rep, _ = _heads(m, step.sequence_parallel)
    width = max(m.num_attention_heads, rep * m.num_key_value_heads) * m.head_dim
    return 2 * step.rows * shard_length(step) * width * DTYPE_BYTES[step.dtype]


def owned_tokens(step: Any) -> list[int]:
    """Scored tokens per rank: a token is scored on the rank holding its predicting position (the position before
    it; with an empty prompt a completion's first token is not scored), for the rows of ``step``'s layout."""
    k, ls = step.sequence_parallel, shard_length(step)
    p, c = step.prompt_len, step.completion_len
    counts = [0] * (k * ls)

    def score(first: int, last: int, times: int = 1) -> None:  # predicting positions first..last (inclusive)
        for pos in range(first, last + 1):
            counts[pos] += times

    if step.packing == "prefix_shared":
        per_row = min(step.pairs_per_row, step.pairs)
        full_rows, rest = divmod(step.pairs, per_row)
        for pairs_in_row, times in ((per_row, full_rows), (rest, 1 if rest else 0)):
            for j in range(pairs_in_row):
                o = j * (p + 2 * c)
                if p:
                    score(o + p - 1, o + p + c - 2, times)  # chosen
                    score(o + p - 1, o + p - 1, times)  # the first rejected token, predicted by the prompt's last
                    score(o + p + c, o + p + 2 * c - 2, times)
                else:
                    score(o, o + c - 2, times)
                    score(o + c, o + 2 * c - 2, times)
    elif p:
        score(p - 1, p + c - 2, 2 * step.pairs)
    else:
        score(0, c - 2, 2 * step.pairs)
    return [sum(counts[r * ls : (r + 1) * ls]) for r in range(k)]


def estimate_parts(m: Any, step: Any) -> tuple[int, int, dict[str, int]]:
    """``(activations, masks, head)`` of the peak rank, for :func:`fastdpo.memory.estimate`: the head is
    :func:`fastdpo.memory.head_bytes` on the most scored tokens any rank owns, its forward/backward peaks at least the
    all-to-all buffers (they are alive inside a layer, before the head runs)."""
    from fastdpo.memory import head_bytes

    head = head_bytes("fastdpo", m, step, positions=max(owned_tokens(step)))
    a2a = alltoall_bytes(m, step)
    head = dict(head, fwd_peak=max(head["fwd_peak"], a2a), bwd_peak=max(head["bwd_peak"], a2a))
    return activation_bytes(m, step), mask_bytes(m, step), head
