"""``DPOEngine``: one DPO step on a collated batch — reference forward, policy forward, preference loss, metrics.

Both forwards run the model's own forward (through DDP / FSDP2 / PEFT wrappers, so their hooks fire) with the output
projection restricted to zero positions, capturing the backbone's last hidden states (see :mod:`fastdpo.models`): the
hidden states of the positions that predict completion tokens (``batch["logp_index"]``) are fed with the
output-embedding weight to the fused head :func:`fastdpo.head.linear_token_logprobs`, so ``[tokens, V]``
logits never exist and prompt positions never reach the head. Policy and reference ask the head for the same token
statistics, so they take the identical fold path: equal weights give bitwise-equal log-probs (rewards exactly 0).
Per-token log-probs are reduced per sequence with the deterministic
:func:`fastdpo.segments.segment_sum` (or LD-DPO's :func:`fastdpo.losses.ld_logps`), then
:func:`fastdpo.losses.preference_loss` gives the loss and TRL's reward metrics; the engine adds ``logits/chosen``,
``logits/rejected``, ``entropy`` and ``mean_token_accuracy`` from the head's no-grad token statistics.

Reference modes:

* ``"model"``: a separate frozen model (any causal LM; also a bitsandbytes 8/4-bit copy from
  :func:`fastdpo.quantize.quantize_model`, or ``ref_quantization=8|4`` to have the engine make one from the policy);
* ``"adapter"``: the policy is a PEFT model, the reference is the same model under ``disable_adapter()``;
* ``"precomputed"``: log-probs read from a :class:`fastdpo.ref_cache.RefLogpCache` (built once with
  :meth:`DPOEngine.precompute_reference`), no reference weights needed at all.

Mixed precision: a half-precision model runs the head in its dtype; under ``torch.autocast`` (an fp32 model, TRL's
default bf16 mixed precision) the head runs in the autocast dtype, like the model's own ``nn.Linear`` head would
(:func:`fastdpo.engine_inputs.head_operands`). Reductions and the returned log-probs, loss and metrics are fp32 either
way.

``step`` returns the loss (with a grad_fn when grad is enabled) and leaves ``backward`` and the optimizer to the
caller, like a ``compute_loss``. When something else owns the data-parallel wrapper (``accelerate`` / ``Trainer``
prepare the model after the engine was built on it), ``step(batch, wrapped_model)`` runs the policy forward through that
``DistributedDataParallel`` wrapper, and ``gather=`` / ``gather_totals=`` turn the metrics into global ones over the
ranks (TRL's gathering).

The class holds the step's order and its state; its parts live beside it: :mod:`fastdpo.engine_inputs` (the batch's
checks, the fused head's call), :mod:`fastdpo.engine_reference` (the three reference modes) and
:mod:`fastdpo.engine_loss` (loss and metrics from the policy's pass, both head-gradient paths).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fastdpo.engine_inputs import call_fused_head, check_batch, check_device
from fastdpo.engine_loss import (
    LossInputs,
    MetricGather,
    gathered_reward_metrics,
    grad_in_forward_loss,
    sequence_loss,
    token_metric_totals,
    token_metrics,
)
from fastdpo.engine_reference import (
    REFERENCE_MODES,
    batch_reference_logps,
    build_reference,
    quiet_bnb,
    reference_context,
    reference_fingerprint,
)
from fastdpo.losses import dpo_metrics, ld_logps
from fastdpo.losses.config import PreferenceLossConfig, config_property
from fastdpo.models import LMParts, enable_gradient_checkpointing, resolve_lm, unwrap_ddp
from fastdpo.models import disable_dropout as _disable_dropout
from fastdpo.ref_cache import RefLogpCache

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.head.function import TokenStats
    from fastdpo.losses.config import LossOptions

# MetricGather, token_metrics and token_metric_totals are re-exported: their home was this module
__all__ = ["DPOEngine", "REFERENCE_MODES", "MetricGather", "token_metric_totals", "token_metrics"]


class DPOEngine:
    """Policy + reference DPO step on batches from :class:`fastdpo.collator.PreferenceCollator`.

    Args:
        model: the policy, any Hugging Face causal LM (PEFT-wrapped too; also inside ``DistributedDataParallel``,
            sharded with FSDP2 ``fully_shard`` or partitioned by DeepSpeed ZeRO-3 -- the forward runs through the
            wrapper's hooks, so gradients are reduced; see :meth:`fastdpo.models.LMParts.call_head`).
        ref_model: the reference model for ``reference="model"``; for ``"precomputed"`` optionally the model the cache
            must have been built from (checked, then not kept).
        reference: ``"model"``, ``"adapter"`` or ``"precomputed"`` (see the module docstring).
        loss_config: a :class:`fastdpo.losses.PreferenceLossConfig`, or
        loss_options: its fields as keywords (``loss_type``, ``beta``, ..., ``use_weighting``, ``ld_alpha``:
            :class:`~fastdpo.losses.LossOptions`, documented and defaulted by the config; TRL 1.16 semantics); a
            keyword given with ``loss_config`` must agree with it. Kept as ``self.loss_config``; the engine applies
            ``ld_alpha`` (LD-DPO) to the policy's and the reference's token log-probs.
        temperature: logits are divided by it before the softmax (policy and reference; TRL's DPO uses 1).
        attn_impl: attention implementation passed to :func:`fastdpo.attention.build_attention_kwargs`.
        grad_in_forward: compute the head's gradients during the forward pass
            (:func:`fastdpo.head.linear_logprobs_loss_grad_in_forward`, 3 GEMMs instead of 4), for every
            loss configuration (WPO and LD-DPO included); pair-local losses
            (:func:`fastdpo.losses.is_pair_local`) are processed pair by pair, the batch-coupled ones (aot,
            aot_unpaired, sft under WPO) as one group. Token metrics (``logits/*``, ``entropy``,
            ``mean_token_accuracy``) are then not reported.
        ref_cache: for ``"precomputed"``: a :class:`~fastdpo.ref_cache.RefLogpCache` or a path to one; ``None``
            reads ``batch["ref_chosen_logps"]``/``batch["ref_rejected_logps"]`` (rows carrying TRL-style
            precomputed columns, which the collator passes through).
        ref_quantization: ``8`` or ``4`` with ``reference="model"`` and no ``ref_model``: the reference becomes a
            bitsandbytes copy of the policy's current weights (:func:`fastdpo.quantize.quantize_model`).
        gradient_checkpointing: enable non-reentrant activation checkpointing on the policy.
        disable_dropout: set dropout probabilities to 0 in policy and reference (TRL's default).
        compute_token_metrics: compute ``logits/*``, ``entropy``, ``mean_token_accuracy`` (cheap, no grad).
        token_tile, vocab_tile, backend, validate: forwarded to the fused head (both modes; see
            :func:`fastdpo.head.linear_token_logprobs`). ``chunk_size`` is their deprecated spelling (an int: the
            vocabulary tile; a tuple: both), accepted with a ``DeprecationWarning``.
        sequence_parallel_size: ``k > 1`` runs every forward sequence-parallel over a group of ``k`` ranks
            (:mod:`fastdpo.sequence_parallel`: Ulysses attention, sequence-sharded fused head). Every rank of a group
            passes the *same* collated batch to ``step``/``compute_logps`` and gets the full, identical loss and
            log-probs. The policy and reference models are switched to the ``fastdpo_ulysses_<impl>`` attention
            implementation (identical to ``<impl>`` outside such a step). Gradients: wrap the policy in
            ``DistributedDataParallel`` or FSDP2 ``fully_shard`` over *all* ranks (data-parallel x sequence-parallel,
            as for data parallelism alone) and they equal the single-process ones after ``backward()``; without a
            wrapper call :meth:`reduce_sequence_parallel_gradients` after ``backward()``. Not with
            ``grad_in_forward`` (refused: the head's gradient is formed from a loss that needs the other ranks' sums).
        sequence_parallel_group: the group's ``ProcessGroup`` or ``DeviceMesh`` (1-D, or with an ``"sp"``
            dimension); ``None``: contiguous ranks ``[i·k, (i+1)·k)`` form group ``i`` (created here: every rank must
            build its engine).

    Raises:
        ValueError / TypeError: inconsistent reference mode and arguments, invalid loss configuration.
    """

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None = None,
        *,
        reference: Literal["model", "adapter", "precomputed"] = "model",
        temperature: float = 1.0,
        attn_impl: str = "auto",
        grad_in_forward: bool = False,
        ref_cache: RefLogpCache | str | os.PathLike[str] | None = None,
        ref_quantization: Literal[4, 8] | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        compute_token_metrics: bool = True,
        token_tile: int | None = None,
        vocab_tile: int | None = None,
        backend: str = "auto",
        validate: bool = True,
        sequence_parallel_size: int = 1,
        sequence_parallel_group: Any = None,
        chunk_size: int | tuple[int, int] | None = None,
        loss_config: PreferenceLossConfig | None = None,
        **loss_options: Unpack[LossOptions],
    ) -> None:
        from fastdpo.head.plan import _legacy_tiles

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {list(REFERENCE_MODES)}, got {reference!r}")
        config = PreferenceLossConfig.resolve(loss_config, loss_options, where="DPOEngine()")
        if not (isinstance(temperature, (int, float)) and float(temperature) > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.model = model
        self.reference = reference
        self.loss_config = config
        # the engine applies ld_alpha to the token log-probs; the loss sees the resulting sequence log-probs
        self._sequence_loss_config = config.replace(ld_alpha=None)
        self.temperature = float(temperature)
        self.attn_impl = attn_impl
        self.grad_in_forward = bool(grad_in_forward)
        self.compute_token_metrics = bool(compute_token_metrics) and not self.grad_in_forward
        self.token_tile, self.vocab_tile = _legacy_tiles("DPOEngine", chunk_size, token_tile, vocab_tile)
        self.backend = backend
        self.validate = bool(validate)
        self.policy_parts: LMParts = resolve_lm(model)
        # (input_ids tensor, format key, kwargs) shared by the two forwards of one step, dropped when it ends
        self._kwargs_cache: tuple[torch.Tensor, Any, dict[str, Any]] | None = None
        self._in_step = False
        # parts of the last wrapper (e.g. accelerate's DDP) step() ran the policy through; see _policy_parts_for
        self._wrapper_parts: LMParts | None = None

        self.ref_model, self.ref_cache = build_reference(
            reference, model, ref_model, ref_cache, ref_quantization, settings=self.ref_settings
        )
        self.ref_parts: LMParts | None = None if self.ref_model is None else resolve_lm(self.ref_model)
        self.sequence_parallel = self._build_sequence_parallel(sequence_parallel_size, sequence_parallel_group)
        if disable_dropout:
            _disable_dropout(model)
            if self.ref_model is not None:
                _disable_dropout(self.ref_model)
        if gradient_checkpointing:
            enable_gradient_checkpointing(unwrap_ddp(model))

    # ------------------------------------------------------------------------------------------------------------
    # the loss configuration's fields, read-only
    loss_types = config_property("loss_type")
    loss_weights = config_property("loss_weights")
    beta = config_property("beta")  # the metrics' reward scale
    use_weighting = config_property("use_weighting")  # WPO: the head also returns log sum p^2
    ld_alpha = config_property("ld_alpha")  # LD-DPO, applied by the engine to the token log-probs

    @property
    def ref_settings(self) -> dict[str, float | None]:
        """The engine settings that change reference log-probs (stamped into a reference cache)."""
        return {"ld_alpha": self.ld_alpha, "temperature": self.temperature}

    def _build_sequence_parallel(self, size: int, group: Any) -> Any:
        """``SequenceParallel`` for ``size > 1`` (policy and reference switched to Ulysses attention), else None."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sequence_parallel_size must be a positive int, got {size!r}")
        if size == 1:
            if group is not None:
                raise ValueError("sequence_parallel_group needs sequence_parallel_size > 1")
            return None
        if self.grad_in_forward:
            raise ValueError(
                "grad_in_forward=True cannot run sequence-parallel: it forms the head's gradient inside the forward "
                "from each pair's loss, which needs the pair's log-probs summed over all ranks' shards first; use "
                "grad_in_forward=False with sequence_parallel_size > 1"
            )
        from fastdpo.sequence_parallel import SequenceParallel
        from fastdpo.ulysses import check_heads

        models = [parts.hf_model for parts in (self.policy_parts, self.ref_parts) if parts is not None]
        for hf_model in models:  # before any collective: a clear error on every rank
            check_heads(hf_model.config, size)
        sp = SequenceParallel(size, group, attn_impl=self.attn_impl)
        sp.check_wrapper(self.model)
        for hf_model in models:
            sp.prepare(hf_model)
        return sp

    def reduce_sequence_parallel_gradients(self) -> None:
        """Average the policy's gradients over the sequence-parallel group: the one call that makes them equal the
        single-process ones after ``backward()`` when the policy is *not* wrapped in DDP / FSDP2 (a wrapper over all
        ranks already does it). No-op without sequence parallelism."""
        from fastdpo.sequence_parallel import average_gradients

        if self.sequence_parallel is not None:
            average_gradients(self.model, self.sequence_parallel.group)

    def _parts_for(self, model: nn.Module) -> LMParts:
        if model is self.model:
            return self.policy_parts
        if self.ref_model is not None and model is self.ref_model:
            assert self.ref_parts is not None
            return self.ref_parts
        if self._wrapper_parts is not None and model is self._wrapper_parts.model:
            return self._wrapper_parts
        return resolve_lm(model)

    def _policy_parts_for(self, model: nn.Module | None) -> LMParts:
        """Parts of the module :meth:`step` runs the policy forward through: the engine's model (``None``) or a
        ``DistributedDataParallel`` wrapper of it, e.g. the one ``accelerate``/``Trainer`` prepared (resolved once and
        kept until another wrapper is passed).

        Raises ``TypeError`` for a non-module and ``ValueError`` for any other module (the head weight, the reference
        and the metrics are the engine's model's, so a different model would silently train against the wrong graph).
        """
        if model is None or model is self.model:
            return self.policy_parts
        if self._wrapper_parts is not None and model is self._wrapper_parts.model:
            return self._wrapper_parts
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if unwrap_ddp(model) is not unwrap_ddp(self.model):
            raise ValueError(
                f"model must be the engine's policy or a DistributedDataParallel wrapper of it, got a "
                f"{type(model).__name__} of another {type(unwrap_ddp(model)).__name__}"
            )
        self._wrapper_parts = resolve_lm(model)
        return self._wrapper_parts

    @property
    def policy_token_stats(self) -> bool:
        """Whether the policy's head pass returns token statistics — the reference pass asks for the same ones, so
        both take the identical fold (bitwise-equal log-probs for equal weights)."""
        return self.compute_token_metrics or self.use_weighting

    def _forward_kwargs(self, parts: LMParts, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Backbone kwargs (position ids + attention mask) for ``batch``; within one :meth:`step` the reference and
        policy forwards share them when both models take the same mask format, dtype and device."""
        from fastdpo.attention import build_attention_kwargs, model_attn_implementation

        param = next((p for p in parts.hf_model.parameters() if p.is_floating_point()), None)
        key = (model_attn_implementation(parts.hf_model), None if param is None else (param.dtype, param.device))
        cached = self._kwargs_cache
        if cached is not None and cached[0] is batch["input_ids"] and cached[1] == key:
            return cached[2]
        kwargs: dict[str, Any] = {"position_ids": batch["position_ids"]}
        kwargs.update(
            build_attention_kwargs(
                batch if isinstance(batch, dict) else dict(batch), parts.hf_model, impl=self.attn_impl
            )
        )
        if self._in_step:
            self._kwargs_cache = (batch["input_ids"], key, kwargs)
        return kwargs

    def _completion_hidden(self, parts: LMParts, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model forward, then the hidden states that predict completion tokens: ``([M, D], anchor)`` where
        ``anchor`` (exactly 0, or None) must be added to whatever the head's output feeds (see
        :meth:`fastdpo.models.LMParts.forward`: it keeps the wrapper's output hooks in the backward graph).
        Sequence-parallel: only the ``[m, D]`` hidden states of this rank's shard that predict the tokens it owns."""
        if self.sequence_parallel is not None:
            shard = self.sequence_parallel.shard(batch, parts.hf_model, cache=True)
            hidden, anchor = parts.forward(shard.input_ids, **shard.forward_kwargs())
            return hidden.flatten(0, 1).index_select(0, shard.local_index), anchor
        kwargs = self._forward_kwargs(parts, batch)
        hidden, anchor = parts.forward(batch["input_ids"], **kwargs)
        return hidden.flatten(0, 1).index_select(0, batch["logp_index"]), anchor

    def _head_options(self) -> dict[str, Any]:
        """The fused head's options both head passes (token statistics, grad-in-forward) take from the engine (the
        model's logit extras are added by :func:`~fastdpo.engine_inputs.call_fused_head`)."""
        return {n: getattr(self, n) for n in ("temperature", "token_tile", "vocab_tile", "validate", "backend")}

    def _sequence_logps(self, token_logps: torch.Tensor, batch: Mapping[str, Any], num_pairs: int) -> torch.Tensor:
        """``[2P]`` fp32 sequence log-probs (LD-weighted when ``ld_alpha`` is set) from ``[M]`` token log-probs."""
        from fastdpo.segments import segment_sum

        if self.ld_alpha is None:
            return segment_sum(token_logps, batch["logp_seq"], 2 * num_pairs, validate=self.validate)
        return ld_logps(
            token_logps,
            batch["logp_pos"],
            batch["logp_seq"],
            batch["chosen_lengths"],
            batch["rejected_lengths"],
            self.ld_alpha,
            validate=self.validate,
        )

    # ------------------------------------------------------------------------------------------------------------
    def compute_logps(
        self, model: nn.Module, batch: Mapping[str, Any], with_grad: bool, *, token_stats: bool = False
    ) -> dict[str, Any]:
        """Per-sequence log-probs of ``model`` on ``batch`` through backbone + fused head.

        Returns a dict with ``chosen_logps``, ``rejected_logps`` (``[P]`` fp32; LD-weighted under LD-DPO),
        ``token_logps`` (``[M]`` fp32), ``nll_sum`` (``[2P]`` fp32 plain ``-sum log p``, differentiable) and, with
        ``token_stats=True``, the head's ``entropy``, ``mean_logit``, ``argmax_hit`` (``[M]``) and ``log_sum_p2``
        (``[M]``, only with WPO) — ``None`` when not computed. ``with_grad=False`` runs under ``torch.no_grad``.
        """
        from fastdpo.segments import segment_sum

        num_pairs = check_batch(batch)
        parts = self._parts_for(model)
        check_device(parts, batch)
        ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        with ctx, quiet_bnb():
            hidden, anchor = self._completion_hidden(parts, batch)
            stats = self._token_stats(parts, hidden, batch, token_stats)
            seq = self._sequence_logps(stats.logprobs, batch, num_pairs)
            if anchor is not None and anchor.requires_grad:
                seq = seq + anchor  # + exactly 0: keeps the wrapper's output hooks (FSDP2 root) in backward
            # plain -sum log p, differentiable: the NLL ("sft") term of an LD-DPO loss trains on it (as TRL does)
            nll_sum = (
                -seq
                if self.ld_alpha is None
                else -segment_sum(stats.logprobs, batch["logp_seq"], 2 * num_pairs, validate=False)
            )
        return {
            "chosen_logps": seq[:num_pairs],
            "rejected_logps": seq[num_pairs:],
            "token_logps": stats.logprobs,
            "nll_sum": nll_sum,
            "entropy": stats.entropy,
            "mean_logit": stats.mean_logit,
            "argmax_hit": stats.argmax_hit,
            "log_sum_p2": stats.log_sum_p2,
        }

    def _token_stats(
        self, parts: LMParts, hidden: torch.Tensor, batch: Mapping[str, Any], token_stats: bool
    ) -> TokenStats:
        """The fused head's per-token statistics (``logprobs`` ``[M]`` fp32, and with ``token_stats`` the no-grad
        ``entropy``, ``mean_logit``, ``argmax_hit``, ``log_sum_p2``) of every completion token of ``batch`` from the
        ``hidden`` states of :meth:`_completion_hidden`. Sequence-parallel: the head runs on this rank's tokens, then
        the statistics of all ``M`` tokens are summed over the group."""
        from fastdpo.head.function import linear_token_logprobs

        sp_shard = (
            None if self.sequence_parallel is None else self.sequence_parallel.shard(batch, parts.hf_model, cache=True)
        )
        labels = batch["logp_labels"] if sp_shard is None else batch["logp_labels"].index_select(0, sp_shard.owned)
        # under ZeRO-3 as a call of the head module (its hooks gather)
        stats = call_fused_head(
            parts,
            hidden,
            linear_token_logprobs,
            labels,
            return_entropy=token_stats,
            return_mean_logit=token_stats,
            return_argmax_hit=token_stats,
            return_log_sum_p2=token_stats and self.use_weighting,
            **self._head_options(),
        )
        if sp_shard is not None:  # this rank's tokens -> every token, summed over the group
            stats = self.sequence_parallel.gather_token_stats(stats, sp_shard, batch["logp_labels"].shape[0])
            if not self._in_step:
                self.sequence_parallel.clear()
        return stats

    def reference_logps(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32, without gradient, in the engine's mode."""
        if self.reference == "precomputed":
            num_pairs = check_batch(batch)
            if self.ref_cache is not None:
                return self.ref_cache.lookup(batch)
            return batch_reference_logps(batch, num_pairs)
        with reference_context(self.reference, self.model, self.ref_model) as ref:
            out = self.compute_logps(ref, batch, with_grad=False, token_stats=self.policy_token_stats)
        return out["chosen_logps"], out["rejected_logps"]

    def reference_fingerprint(self) -> str:
        """Fingerprint of the reference (for cache stamps): the ref model, or the PEFT base under adapter mode."""
        return reference_fingerprint(self.reference, self.model, self.ref_model, self.ref_cache)

    def precompute_reference(
        self, batches: Iterable[Mapping[str, Any]], path: str | os.PathLike[str] | None = None
    ) -> RefLogpCache:
        """Reference log-probs of every pair in ``batches`` as a :class:`RefLogpCache` (saved atomically to ``path``
        when given). Use it later with ``DPOEngine(model, reference="precomputed", ref_cache=path)``.

        With ``torch.distributed`` initialized and a ``path``, every rank passes its own shard of the batches (all
        ranks call this together): the rows are gathered and rank 0 writes the file once
        (:meth:`RefLogpCache.build_distributed`); every rank returns the whole cache.
        """
        if self.reference == "precomputed":
            raise ValueError("precompute_reference needs a live reference (reference='model' or 'adapter')")
        if path is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return RefLogpCache.build_distributed(
                self.reference_logps, batches, path, model_hash=self.reference_fingerprint(), settings=self.ref_settings
            )
        cache = RefLogpCache.build(
            self.reference_logps, batches, model_hash=self.reference_fingerprint(), settings=self.ref_settings
        )
        if path is not None:
            cache.save(path)
        return cache

    # ------------------------------------------------------------------------------------------------------------
    def step(
        self,
        batch: Mapping[str, Any],
        model: nn.Module | None = None,
        *,
        gather: MetricGather | None = None,
        gather_totals: MetricGather | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One DPO step's loss and metrics on a collated batch (``backward`` and the optimizer are the caller's).

        Args:
            batch: a :class:`~fastdpo.collator.PreferenceCollator` batch on the model's device.
            model: the module the policy forward runs through: ``None`` (the engine's model) or a
                ``DistributedDataParallel`` / DeepSpeed ``DeepSpeedEngine`` wrapper of the engine's model — e.g. the one
                ``accelerate`` prepared, which
                ``Trainer.compute_loss`` receives — so that DDP's reducer sees the forward and averages the gradients
                over ranks in backward. The reference forward runs the reference as the engine holds it (no gradient,
                nothing to reduce). Any other module raises ``ValueError``.
            gather: data-parallel metrics: all-gathers a tensor over the ranks along dim 0 (``[P, k] -> [sum P, k]``,
                e.g. ``accelerator.gather``). The reward / log-prob metrics are then means over every rank's pairs.
            gather_totals: the same for the token metrics' totals, a ``[1, 2k]`` tensor of (sum, count) per metric;
                the gathered rows are summed before dividing (e.g. ``accelerator.gather_for_metrics``; default:
                ``gather``). With either,
                every rank must call ``step`` (they are collectives) and gets the same metrics; the loss stays this
                rank's own.

        Returns ``(loss, metrics)``: 0-dim fp32 loss (with a grad_fn when grad is enabled) and TRL-named detached
        0-dim tensors ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected``, and (unless ``grad_in_forward``) ``logits/chosen``, ``logits/rejected``,
        ``entropy``, ``mean_token_accuracy``.
        """
        num_pairs = check_batch(batch)
        parts = self._policy_parts_for(model)
        if self.sequence_parallel is not None:
            self.sequence_parallel.check_wrapper(parts.model)
        check_device(parts, batch)
        self._in_step = True
        try:
            ref_c, ref_r = self.reference_logps(batch)
            x = LossInputs(batch, num_pairs, ref_c, ref_r, self._sequence_loss_config, self.ld_alpha, self.validate)
            if self.grad_in_forward and torch.is_grad_enabled():
                loss, metrics, pol_c, pol_r = self._step_grad_in_forward(parts, x)
            else:
                loss, metrics, pol_c, pol_r = self._step(parts, x, gather_totals or gather)
        finally:
            self._in_step = False
            self._kwargs_cache = None
            if self.sequence_parallel is not None:
                self.sequence_parallel.clear()
        if gather is not None:
            metrics.update(gathered_reward_metrics(pol_c, pol_r, ref_c, ref_r, self.beta, gather))
        return loss, metrics

    def _step(
        self, parts: LMParts, x: LossInputs, gather_totals: MetricGather | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(loss, metrics, policy chosen logps [P], policy rejected logps [P])`` through ``parts.model``."""
        pol = self.compute_logps(parts.model, x.batch, with_grad=True, token_stats=self.policy_token_stats)
        loss, metrics = sequence_loss(pol, x)
        if self.compute_token_metrics:
            metrics.update(token_metrics(pol, x.batch["logp_seq"], x.num_pairs, gather_totals=gather_totals))
        return loss, metrics, pol["chosen_logps"], pol["rejected_logps"]

    def _step_grad_in_forward(
        self, parts: LMParts, x: LossInputs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like :meth:`_step` with the head's gradients formed in the forward (no token metrics; see
        :func:`fastdpo.engine_loss.grad_in_forward_loss`)."""
        hidden, anchor = self._completion_hidden(parts, x.batch)
        loss, seq = grad_in_forward_loss(parts, hidden, x, self._head_options())
        if anchor is not None and anchor.requires_grad:
            loss = loss + anchor  # + exactly 0: keeps the wrapper's output hooks (FSDP2 root) in backward
        p = x.num_pairs
        metrics = dpo_metrics(seq[:p], seq[p:], x.ref_c, x.ref_r, self.beta)
        return loss, metrics, seq[:p], seq[p:]
