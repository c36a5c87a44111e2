"""The memory of one DPO training step, computed from shapes (the model behind ``fastdpo memory``), for naive PyTorch,
TRL and fastdpo with each of its options, so that where the savings come from is visible at a glance.

Variants (same model, optimizer and reference unless the variant changes it):

* ``naive`` — the HF model's forward materializes logits ``[R·L, V]`` for every position, then
  ``log_softmax(logits.float())`` + gather (the textbook DPO step).
* ``trl`` — TRL 1.16's DPOTrainer: ``ChunkedLogProbFunction`` over the positions that reach the head (every position
  on CPU, completion positions on CUDA), with ``[min(n, 4096), min(V, 32768)]`` tiles, fp32 gradient accumulators.
* ``fastdpo`` — only completion tokens reach the head; fused chunked head, no ``[n, V]`` tensor (``--packing``,
  ``--reference`` as given).
* ``fastdpo+prefix_shared`` — and each pair packed as ``[prompt, chosen, rejected]``: the prompt's activations once
  per pair (:data:`VARIANT_OPTIONS`).
* ``fastdpo+grad_in_forward`` — and the LM-head gradients formed in the forward (no logits kept or recomputed for
  the backward: a time saving, the gradients are alive from the end of the forward instead).
* ``fastdpo+precomputed_ref`` — and reference log-probs from a precomputed cache (no reference weights).
* ``fastdpo+all`` — all three.

Batch: ``pairs`` preference pairs → ``R = 2·pairs`` rows of ``L = prompt_len + completion_len`` tokens (no padding,
no attention mask: the layout of naive and TRL; memory-wise also fastdpo's ``packing="padding_free"`` under
flash-attention varlen, the same tokens without a mask). fastdpo's ``packing="prefix_shared"`` instead packs each
pair as one row ``[prompt, chosen, rejected]`` (``pairs_per_row`` pairs per row, as ``PreferenceCollator(
max_tokens_per_row=pairs_per_row·(prompt_len + 2·completion_len))`` does), so the prompt passes the backbone once per
pair; the price is the packed rows' 4-D attention mask (see :func:`activation_bytes`).
Peak = weights + reference + optimizer state (resident all step) + the largest of the phases: reference forward,
end of the policy forward / start of backward (activations + head), end of backward (gradients; with tied embeddings
the embedding's dense gradient briefly exists next to the lm_head's), optimizer update; for the engine
(``prefix_shared``) also the moment its lm_head weight gradient is summed with a dense zero one (see :func:`estimate`).

The model's shape (presets, ``config.json``, parameter counts) is :mod:`fastdpo.model_shape`; the command (table,
``--plot``, ``--measure``) is :mod:`fastdpo.memory_cli`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fastdpo.model_shape import PRESETS, ModelShape, load_model, param_counts, shape_from_config

# the model's shape lives in fastdpo.model_shape; its names stay importable from here, where they were
__all__ = [
    "DTYPE_BYTES",
    "MIB",
    "PACKINGS",
    "PRESETS",
    "SHARDS",
    "TORCH_DTYPES",
    "TRL_TILE_TEMPS_CPU",
    "TRL_TOKEN_TILE",
    "TRL_VOCAB_TILE",
    "VARIANTS",
    "VARIANT_OPTIONS",
    "ZERO3_MAX_LIVE_PARAMS",
    "ModelShape",
    "StepConfig",
    "activation_bytes",
    "estimate",
    "estimate_sharded",
    "head_bytes",
    "load_model",
    "mask_bytes",
    "norm_mlp_bytes",
    "param_counts",
    "shape_from_config",
]

VARIANTS = (
    "naive",
    "trl",
    "fastdpo",
    "fastdpo+prefix_shared",
    "fastdpo+grad_in_forward",
    "fastdpo+precomputed_ref",
    "fastdpo+all",
)
#: what each fastdpo option variant changes in the step (see :meth:`StepConfig.for_variant`)
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "fastdpo+prefix_shared": {"packing": "prefix_shared"},
    "fastdpo+grad_in_forward": {"grad_in_forward": True},
    "fastdpo+precomputed_ref": {"reference": "precomputed"},
    "fastdpo+all": {"packing": "prefix_shared", "grad_in_forward": True, "reference": "precomputed"},
}
PACKINGS = ("padding_free", "prefix_shared")  # fastdpo's; naive and TRL always run 2 rows per pair
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRL_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
TRL_TILE_TEMPS_CPU = 7  # fp32 tile temporaries alive in TRL's torch backward fold (y, z, log_p, p, grad, mask, product)
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------------
# the step


@dataclass(frozen=True)
class StepConfig:
    """One DPO step: ``pairs`` pairs of ``prompt_len`` + ``completion_len`` tokens, parameters in ``dtype``
    (``fp32``/``bf16``/``fp16``), AdamW states in the parameter dtype (torch's default), ``reference`` ``"model"``
    (a frozen copy) or ``"precomputed"`` (no reference weights), ``device`` (``cpu`` → TRL's torch fold over every
    position; ``cuda`` → TRL's Triton fold over completion positions).

    ``packing`` is the fastdpo variant's row layout (naive and TRL always run ``padding_free``'s): ``"padding_free"``
    — ``2·pairs`` rows of ``prompt_len + completion_len`` tokens, no attention mask; ``"prefix_shared"`` —
    ``pairs_per_row`` pairs ``[prompt, chosen, rejected]`` per row (the last row padded to the others' length), with
    the engine's 4-D attention mask."""

    pairs: int = 4
    prompt_len: int = 512
    completion_len: int = 512
    dtype: str = "bf16"
    optimizer: str = "adamw"
    reference: str = "model"
    device: str = "cuda"
    packing: str = "padding_free"
    pairs_per_row: int = 1
    grad_in_forward: bool = False
    sequence_parallel: int = 1  # fastdpo's sequence-parallel group size: its estimate is per rank (fastdpo.sp_memory)

    def __post_init__(self) -> None:
        for name in ("pairs", "prompt_len", "completion_len"):
            if int(getattr(self, name)) < (0 if name == "prompt_len" else 1):
                raise ValueError(
                    f"{name} must be {'>= 0' if name == 'prompt_len' else 'positive'}, got {getattr(self, name)}"
                )
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.reference not in ("model", "precomputed"):
            raise ValueError(f"reference must be 'model' or 'precomputed', got {self.reference!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if int(self.pairs_per_row) < 1:
            raise ValueError(f"pairs_per_row must be positive, got {self.pairs_per_row}")
        if self.pairs_per_row != 1 and self.packing != "prefix_shared":
            raise ValueError("pairs_per_row applies to packing='prefix_shared' only")
        sp = self.sequence_parallel
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:  # a ValueError, and no torch import here
            raise ValueError(f"sequence_parallel must be a positive int, got {sp!r}")

    @property
    def rows(self) -> int:
        """Rows the backbone runs: ``2·pairs`` (padding_free), ``ceil(pairs / pairs_per_row)`` (prefix_shared)."""
        if self.packing == "prefix_shared":
            return math.ceil(self.pairs / min(self.pairs_per_row, self.pairs))
        return 2 * self.pairs

    @property
    def seq_len(self) -> int:
        """Tokens per row (padding included): ``prompt_len + completion_len`` (padding_free),
        ``min(pairs_per_row, pairs)·(prompt_len + 2·completion_len)`` (prefix_shared)."""
        if self.packing == "prefix_shared":
            return min(self.pairs_per_row, self.pairs) * (self.prompt_len + 2 * self.completion_len)
        return self.prompt_len + self.completion_len

    @property
    def scored_tokens(self) -> int:
        """Completion tokens with a predicting position (fastdpo's head positions): ``2·pairs·completion_len``, one
        fewer per sequence when ``prompt_len`` is 0 (its first token has nothing before it, as TRL's mask)."""
        return 2 * self.pairs * (self.completion_len - (self.prompt_len == 0))

    def for_variant(self, variant: str) -> StepConfig:
        """The step ``variant`` runs: ``packing`` and ``grad_in_forward`` are fastdpo's (naive and TRL get
        ``padding_free``'s rows and their own head); the ``fastdpo+...`` variants apply :data:`VARIANT_OPTIONS`."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "fastdpo":
            return self
        if variant in VARIANT_OPTIONS:
            return replace(self, **VARIANT_OPTIONS[variant])
        return replace(self, packing="padding_free", pairs_per_row=1, grad_in_forward=False, sequence_parallel=1)


def norm_mlp_bytes(m: ModelShape, b: int) -> tuple[int, int]:
    """Per token, with ``b`` the dtype's bytes: ``(layer, final_norm)``, the bytes one decoder layer's norms and MLP
    save for backward and those the final norm saves without its output (the head's input, counted by
    :func:`head_bytes`); the terms are :func:`activation_bytes`'."""
    d = m.hidden_size
    if m.norms_per_layer == 4:  # gemma2: input, post-attention, pre-feed-forward, post-feed-forward norms
        norm_in = 8 * d + 4 + b * d
        norms = 2 * norm_in + 2 * (8 * d + 4)
    else:
        norm_in = 4 * d + 2 * b * d + 4
        norms = 2 * norm_in
    return norms + 4 * b * m.intermediate_size, norm_in - b * d


def activation_bytes(m: ModelShape, step: StepConfig) -> int:
    """Bytes the policy backbone saves for backward (HF Llama/Qwen2 decoder layers with SDPA attention, Gemma-2 with
    eager attention) on ``step.rows`` rows of ``L = step.seq_len`` tokens (``step.packing``'s layout), per token and
    layer, with ``b`` the dtype's bytes, ``q = heads·head_dim``, ``kv = kv_heads·head_dim``:

    * Llama/Qwen2 RMSNorm: fp32 input, normalized tensor and weighted output in ``b`` bytes, fp32 rsqrt:
      ``4·D + 2·b·D + 4``. Gemma RMSNorm: fp32 input and fp32 normalized ``8·D + 4``, plus the ``b``-byte output
      when it feeds a projection (input and pre-feed-forward norms).
    * SDPA attention: rotated q and k, v, output (the ``o_proj`` input is a view of it), fp32 log-sum-exp per head:
      ``b·(2q + 2kv) + 4·H``. Eager (Gemma-2): q, repeated k and v, ``o_proj`` input ``4·b·q`` and per row the
      ``[H, L, L]`` soft-capped scores (``b``), fp32 softmax and its ``b`` copy.
    * MLP: gate, up, act(gate), their product: ``4·b·I``.

    Plus the final norm (without its output: the head's input, counted by :func:`head_bytes`) and the rotary cos/sin
    tables: ``2·L·head_dim·b`` (no position ids), ``2·R·L·head_dim·b`` with prefix_shared's per-row position ids.

    prefix_shared rows carry the engine's bool ``[R, 1, L, L]`` mask (:func:`fastdpo.attention.build_attention_kwargs`;
    eager models get additive ``b``-byte masks, which eager attention adds to the scores without saving them). With
    SDPA, torch converts the bool mask to an additive one in the query dtype inside every layer's call and the fused
    CPU attention saves it for backward (``R·L²·b`` per layer); and HF repeats k and v to all heads when a mask is
    given (no native GQA), so SDPA saves ``b·4q + 4·H`` per token. The masks themselves, alive during the forwards
    only, are :func:`mask_bytes`.

    Matches ``saved_tensors_hooks`` counts on tiny HF models, through the engine's forward for prefix_shared
    (tests/test_memory.py).
    """
    b = DTYPE_BYTES[step.dtype]
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    tokens = step.rows * step.seq_len
    per_token, final_norm = norm_mlp_bytes(m, b)
    masked = step.packing == "prefix_shared"
    if m.eager_attention:
        per_token += 4 * b * q
        scores = step.rows * m.num_attention_heads * step.seq_len**2 * (b + 4 + (b if b != 4 else 0))
    else:
        per_token += b * (4 * q if masked else 2 * q + 2 * kv) + 4 * m.num_attention_heads
        scores = step.rows * step.seq_len**2 * b if masked else 0  # the per-layer additive copy of the mask
    rotary = 2 * (step.rows if masked else 1) * step.seq_len * m.head_dim * b
    return m.num_hidden_layers * (tokens * per_token + scores) + tokens * final_norm + rotary


def mask_bytes(m: ModelShape, step: StepConfig) -> int:
    """The attention masks the engine builds for ``step`` (bytes), alive through the reference and policy forwards
    (not saved for backward): one ``[R, 1, L, L]`` per attention layer type, bool for SDPA, ``b``-byte additive for
    eager attention; 0 for padding_free (no mask)."""
    if step.packing != "prefix_shared":
        return 0
    per_mask = step.rows * step.seq_len**2 * (DTYPE_BYTES[step.dtype] if m.eager_attention else 1)
    return m.attention_layer_types * per_mask


def head_bytes(variant: str, m: ModelShape, step: StepConfig, positions: int | None = None) -> dict[str, int]:
    """The LM-head / log-prob part of one model's step, in bytes: ``saved`` (kept from forward to backward, including
    the head's copy of its input hidden states), ``fwd_peak`` and ``bwd_peak`` (the head's peak on top of the
    backbone's activations, in the forward and at the start of backward; ``bwd_peak`` includes the output-embedding
    and hidden-state gradient buffers the head allocates) and ``ref_peak`` (the head run forward-only, no grad).

    With ``b`` the dtype's bytes, ``R = 2·pairs`` rows of ``L = prompt_len + completion_len`` tokens (naive and TRL
    run this layout whatever ``step.packing`` says), ``C`` completion tokens per row:

    * naive: the HF forward projects ``n = R·L`` positions: logits ``[n, V]`` (``b``), an fp32 copy of the
      ``n' = R·(L−1)`` shifted rows (the ``.float()`` cast, or the contiguous copy ``log_softmax`` makes of the
      shifted view), ``log_softmax`` of them (fp32, saved), the lm_head's saved input ``n·D·b``. Backward: the
      gathered gradient, the saved output and the input gradient, ``12·n'·V``, then the ``[V, D]`` weight gradient.
    * trl: TRL 1.16's ``ChunkedLogProbFunction`` on ``n`` positions (``R·(L−1)``, all of them, on CPU; ``R·C`` on CUDA
      where TRL compacts) from a ``[n, D]`` copy; ``[min(n, 4096), min(V, 32768)]`` tiles; its torch fold (CPU) keeps
      ~3 fp32 tile temporaries in forward and ~7 in backward (none with the Triton fold); fp32 ``[n, D]`` and
      ``[V, D]`` gradient accumulators, cast to ``b`` when ``b != 4``.
    * fastdpo: ``n = step.scored_tokens`` completion tokens (the same for both packings) compacted to a ``[n, D]``
      copy; fp32 tiles of the head's own plan (:func:`fastdpo.head.plan._plan`), two (forward) / one
      (backward) of them; up to ``DEFAULT_KEEP_LOGITS_BYTES`` of logits tiles kept for backward; fp32 gradient
      accumulators. ``positions`` overrides ``n`` (fastdpo: one sequence-parallel rank's scored tokens).
    * fastdpo with ``grad_in_forward`` (:func:`fastdpo.head.linear_logprobs_loss_grad_in_forward`): tokens
      in chunks of whole pairs of at most ``DEFAULT_GIF_LOGITS_BYTES`` of fp32 logits (kept while the chunk's
      gradients are formed), the chunk's ``[n_c, D]`` copy, fp32 ``[n, D]`` and ``[V, D]`` gradient accumulators filled
      during the forward and cast to ``b`` at its end; the ``b``-byte gradients are what is saved, and the backward
      scales them by the incoming gradient (a second copy).
    """
    step = step.for_variant(variant)
    if variant.startswith("fastdpo"):
        variant = "fastdpo"
    b = DTYPE_BYTES[step.dtype]
    v, d = m.vocab_size, m.hidden_size
    r, seq, c = step.rows, step.seq_len, step.completion_len
    half = b != 4
    if variant == "naive":
        n, n1 = r * seq, r * (seq - 1)
        logp = 4 * n1 * v
        saved = logp + n * d * b
        # the shifted fp32 logits log_softmax reads: the .float() copy (b != 4) or a contiguous copy of the
        # non-contiguous [:, :-1] view (fp32) — one fp32 [n', V] either way
        fwd = n * v * b + logp + saved
        # log_softmax backward: saved output + gathered gradient + input gradient; then the lm_head's backward: the
        # [n, V] logits gradient and the [V, D] weight gradient
        bwd = max(saved + 2 * logp, n * d * b + n * v * b + v * d * b)
        ref = n * v * b + 2 * logp
        return {"positions": n, "saved": saved, "fwd_peak": fwd, "bwd_peak": bwd, "ref_peak": ref}
    if variant == "trl":
        n = r * (seq - 1) if step.device == "cpu" else r * c
        tile = min(n, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE)
        cpu = step.device == "cpu"
        saved = n * d * b + 4 * n + 8 * n  # hidden copy, log_z, targets
        fwd = saved + tile * (b + 4 * (3 if cpu else 0)) + 7 * 4 * n
        grads = 4 * (n * d + v * d) + (b * (n * d + v * d) if half else 0)
        bwd = saved + tile * (b + 4 * (TRL_TILE_TEMPS_CPU if cpu else 0)) + grads
        ref = n * d * b + tile * (b + 4 * (3 if cpu else 0)) + 7 * 4 * n
        return {"positions": n, "saved": saved, "fwd_peak": fwd, "bwd_peak": bwd, "ref_peak": ref}
    import torch

    from fastdpo.head.plan import DEFAULT_GIF_LOGITS_BYTES, DEFAULT_KEEP_LOGITS_BYTES, _plan

    n = step.scored_tokens if positions is None else positions
    device = torch.device(step.device)
    grads = 4 * (n * d + v * d) + (b * (n * d + v * d) if half else 0)
    if step.grad_in_forward:
        chunk = min(n, max(2 * c, DEFAULT_GIF_LOGITS_BYTES // (4 * v)))  # whole pairs: at least one pair
        tok, voc = _plan(chunk, v, device)
        work = chunk * d * b + min(4 * chunk * v, DEFAULT_GIF_LOGITS_BYTES) + 2 * 4 * tok * voc
        saved = b * (n * d + v * d)
        # during the chunk loop: fp32 accumulators + a chunk's work; at its end: fp32 accumulators + their b copies
        fwd = 4 * (n * d + v * d) + max(work, saved if half else 0) + 8 * 4 * n
        bwd = 2 * saved
        ref_tok, ref_voc = _plan(n, v, device)
        ref = n * d * b + 2 * 4 * ref_tok * ref_voc + 8 * 4 * n
        return {"positions": n, "saved": saved, "fwd_peak": fwd, "bwd_peak": bwd, "ref_peak": ref}
    tok, voc = _plan(n, v, device)
    tile = 4 * tok * voc
    kept = min(DEFAULT_KEEP_LOGITS_BYTES, 4 * n * v)
    saved = n * d * b + 16 * n + kept  # compacted hidden, labels (int64), lse (float64), kept tiles
    fwd = saved + 2 * tile + 8 * 4 * n
    bwd = saved + tile + grads
    ref = n * d * b + 2 * tile + 8 * 4 * n
    return {"positions": n, "saved": saved, "fwd_peak": fwd, "bwd_peak": bwd, "ref_peak": ref}


def _report(
    variant: str,
    weights: int,
    grads: int,
    optimizer: int,
    reference: int,
    activations: int,
    attention_mask: int,
    head: dict[str, int],
    phases: dict[str, int],
) -> dict[str, Any]:
    """The fields :func:`estimate` and :func:`estimate_sharded` share (bytes), the peak phase being the largest."""
    peak_phase = max(phases, key=phases.__getitem__)
    return {
        "variant": variant,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "reference": reference,
        "activations": activations,
        "attention_mask": attention_mask,
        "logits": max(head["fwd_peak"], head["bwd_peak"]),
        "logits_saved": head["saved"],
        "head_positions": head["positions"],
        "peak": phases[peak_phase],
        "peak_phase": peak_phase,
        "phases": phases,
    }


def estimate(m: ModelShape, step: StepConfig, variant: str) -> dict[str, Any]:
    """Memory breakdown (bytes) of one DPO step with ``variant``'s log-prob head.

    Keys: ``weights``, ``grads``, ``optimizer``, ``reference`` (resident), ``activations`` (policy backbone, saved for
    backward), ``attention_mask`` (prefix_shared's masks, alive during the forwards), ``logits`` (the head's peak on
    top of the activations), ``peak`` (total), ``peak_phase`` (where it happens), ``phases`` (each phase's total) and
    ``peak_parts`` (what is alive at the peak phase, by part; its values sum to ``peak``; the ``grads`` part there
    includes transient optimizer / tied-embedding buffers).
    ``step.packing`` applies to the fastdpo variant (see :meth:`StepConfig.for_variant`); with ``prefix_shared`` it is
    :class:`fastdpo.DPOEngine`'s step."""
    step = step.for_variant(variant)
    b = DTYPE_BYTES[step.dtype]
    p = param_counts(m)
    weights = p["total"] * b
    grads = p["total"] * b
    optimizer = 2 * p["total"] * b if step.optimizer == "adamw" else 0
    reference = weights if step.reference == "model" else 0
    if step.sequence_parallel > 1:  # fastdpo's per-rank step (for_variant gives naive/TRL a single process)
        from fastdpo.sp_memory import estimate_parts

        if step.grad_in_forward:
            raise ValueError("grad_in_forward is not available with sequence parallelism (see DPOEngine)")
        act, mask, head = estimate_parts(m, step)
    else:
        act = activation_bytes(m, step)
        mask = mask_bytes(m, step)
        head = head_bytes(variant, m, step)
    resident = {"weights": weights, "optimizer": optimizer, "reference": reference}
    # tied embeddings: the embedding's dense gradient exists next to the lm_head's before they are summed; with the
    # naive head (F.linear's weight gradient) autograd sums them out of place, a third [V, D] (measured on CPU)
    tied_extra = (2 if variant == "naive" else 1) * p["embed"] * b if m.tie_word_embeddings else 0
    parts = {
        # the reference forward keeps one layer's working set and its head's forward-only peak
        "reference forward": {
            **resident,
            "attention_mask": mask if step.reference == "model" else 0,
            "logits": head["ref_peak"] if step.reference == "model" else 0,
        },
        "policy forward": {**resident, "attention_mask": mask, "activations": act, "logits": head["fwd_peak"]},
        "backward start": {**resident, "activations": act, "logits": head["bwd_peak"]},
        "backward end": {**resident, "grads": grads + tied_extra},
        "optimizer step": {**resident, "grads": grads + (2 * p["largest"] * b if step.optimizer == "adamw" else 0)},
    }
    phases = {name: sum(bytes_.values()) for name, bytes_ in parts.items()}
    report = _report(variant, weights, grads, optimizer, reference, act, mask, head, phases)
    return report | {"peak_parts": {k: v for k, v in parts[report["peak_phase"]].items() if v}, "params": p["total"]}


SHARDS = ("zero3", "fsdp2")
ZERO3_MAX_LIVE_PARAMS = 10**9  # DeepSpeed's stage3_max_live_parameters default


def estimate_sharded(m: ModelShape, step: StepConfig, variant: str, world: int, shard: str) -> dict[str, Any]:
    """Per-rank memory (bytes) of one DPO step with the policy and the reference model sharded over ``world`` ranks;
    ``step.pairs`` are each rank's pairs (a per-device batch). Same keys as :func:`estimate`, plus ``world_size``
    and ``shard``; ``weights``/``grads``/``optimizer``/``reference`` are what each rank keeps resident.

    ``shard="zero3"`` -- DeepSpeed ZeRO-3 with its defaults and transformers' ``"auto"`` buckets, as
    ``accelerate``/TRL run it. Resident per rank: the parameter partitions ``P·b/N``, the fp32 master partitions
    ``4P/N`` (ZeRO keeps them whatever the parameter dtype), the gradient partitions ``P·b/N``, AdamW's fp32
    moments ``8P/N``, and the reference's partitions ``P·b/N``. Gathered parameters: ZeRO keeps up to
    ``stage3_max_live_parameters`` (10⁹) parameters gathered when they are used again soon, which in a DPO step
    (forward, then backward in reverse) means ``min(P, 10⁹)·b`` from the end of the policy forward to the start of
    the backward (the reference's own engine likewise during its pass). The fused head's working set is the
    single-process one (:func:`head_bytes`) on top: its weight is among the gathered parameters, and the fused head
    makes no other copy of it. On CPU the gloo all-gather stages a flat copy of what it gathers (``+ V·D·b`` while
    the reference gathers its head).

    ``shard="fsdp2"`` -- ``fully_shard`` in accelerate's ``fsdp_version: 2`` layout (each decoder layer, the
    embedding, and the ``[final norm, lm_head]`` tail that stays unsharded from forward to backward, then the root),
    the reference sharded as TRL's ``prepare_fsdp`` does (root only, which FSDP2 keeps unsharded after its forward:
    its sharded and its full parameters stay allocated). Resident: the parameter shards ``P·b/N``, AdamW's moments
    ``2P·b/N`` (torch's, in the parameter dtype), the reference ``P·b/N + P·b``. Transient: the unsharded tail
    ``(V·D + D)·b`` through forward and backward, one decoder layer's unsharded parameters in the forward, and in
    the backward, next to the head's working set, the tail gradient's reduce-scattered shard ``V·D·b/N``.

    Activations, the attention masks and the head's working set are those of one rank's batch, as in
    :func:`estimate`; the variant only changes the head's part (every variant runs its head on gathered weights).
    """
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    from fastdpo._validation import check_int

    check_int("world size", world, minimum=1)
    step = step.for_variant(variant)
    b = DTYPE_BYTES[step.dtype]
    p = param_counts(m)
    total, n = p["total"], world
    head_w = m.vocab_size * m.hidden_size
    act = activation_bytes(m, step)
    mask = mask_bytes(m, step)
    head = head_bytes(variant, m, step)
    with_ref = step.reference == "model"
    adamw = step.optimizer == "adamw"
    stage = head_w * b if step.device == "cpu" else 0  # gloo's flat staging copy of a gathered tensor
    if shard == "zero3":
        weights = total * b // n
        master = 4 * total // n
        grads = total * b // n
        optimizer = master + (8 * total // n if adamw else 0)
        reference = total * b // n if with_ref else 0
        live = min(total, ZERO3_MAX_LIVE_PARAMS) * b
        resident = weights + grads + optimizer + reference
        ref_phase = resident + (mask + live + head["ref_peak"] + stage if with_ref else 0)
        fwd_phase = resident + mask + act + live + head["fwd_peak"]
        bwd_phase = resident + act + live + head["bwd_peak"]
        end_phase = resident + live + 2 * p["largest"] * b  # the embedding's full gradient and its reduce bucket
        opt_phase = resident + (2 * 4 * p["largest"] // n if adamw else 0)
    else:
        weights = total * b // n
        grads = total * b // n  # the sharded gradients, from the end of backward to zero_grad
        optimizer = 2 * total * b // n if adamw else 0
        reference = total * b // n + total * b if with_ref else 0
        tail = (head_w + m.hidden_size) * b
        resident = weights + optimizer + reference
        ref_phase = resident + mask + head["ref_peak"]
        fwd_phase = resident + mask + act + tail + p["layer"] * b + head["fwd_peak"]
        bwd_phase = resident + act + tail + head["bwd_peak"] + head_w * b // n
        end_phase = resident + grads + tail
        opt_phase = resident + grads + (2 * p["largest"] * b // n if adamw else 0)
    phases = {
        "reference forward": ref_phase,
        "policy forward": fwd_phase,
        "backward start": bwd_phase,
        "backward end": end_phase,
        "optimizer step": opt_phase,
    }
    report = _report(variant, weights, grads, optimizer, reference, act, mask, head, phases)
    return report | {"params": total, "world_size": world, "shard": shard}
