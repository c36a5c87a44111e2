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
(:func:`_head_operands`). Reductions and the returned log-probs, loss and metrics are fp32 either way.

``step`` returns the loss (with a grad_fn when grad is enabled) and leaves ``backward`` and the optimizer to the
caller, like a ``compute_loss``. When something else owns the data-parallel wrapper (``accelerate`` / ``Trainer``
prepare the model after the engine was built on it), ``step(batch, wrapped_model)`` runs the policy forward through that
``DistributedDataParallel`` wrapper, and ``gather=`` / ``gather_totals=`` turn the metrics into global ones over the
ranks (TRL's gathering).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fastdpo.losses.config import PreferenceLossConfig
from fastdpo.losses.metrics import ENTROPY, LOGITS_CHOSEN, LOGITS_REJECTED, MEAN_TOKEN_ACCURACY
from fastdpo.models import (
    LMParts,
    enable_gradient_checkpointing,
    is_peft_model,
    keep_requires_grad,
    resolve_lm,
    unwrap_ddp,
)
from fastdpo.models import disable_dropout as _disable_dropout
from fastdpo.quantize import quantize_model
from fastdpo.ref_cache import RefLogpCache, model_fingerprint

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.losses.config import LossOptions

__all__ = ["DPOEngine", "REFERENCE_MODES"]

REFERENCE_MODES: tuple[str, ...] = ("model", "adapter", "precomputed")

#: all-gathers a tensor over data-parallel ranks along dim 0 (``accelerator.gather`` semantics), see DPOEngine.step
MetricGather = Callable[[torch.Tensor], torch.Tensor]

_BATCH_KEYS = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "logp_index",
    "logp_labels",
    "logp_seq",
    "chosen_lengths",
    "rejected_lengths",
    "num_pairs",
)
# batch tensors the forwards and the head consume: they must live on the model's device
_DEVICE_KEYS = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "token_seq",
    "token_role",
    "token_pair",
    "logp_index",
    "logp_labels",
    "logp_seq",
    "logp_pos",
    "chosen_lengths",
    "rejected_lengths",
)


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
        self.loss_types, self.loss_weights = config.loss_type, config.loss_weights
        self.beta = config.beta
        self.use_weighting = config.use_weighting
        self.ld_alpha = config.ld_alpha
        self.temperature = float(temperature)
        self.attn_impl = attn_impl
        self.grad_in_forward = bool(grad_in_forward)
        self.compute_token_metrics = bool(compute_token_metrics) and not self.grad_in_forward
        self.token_tile, self.vocab_tile = _legacy_tiles("DPOEngine", chunk_size, token_tile, vocab_tile)
        self.backend = backend
        self.validate = bool(validate)
        self.policy_parts: LMParts = resolve_lm(model)
        self.ref_model: nn.Module | None = None
        self.ref_parts: LMParts | None = None
        self.ref_cache: RefLogpCache | None = None
        # (input_ids tensor, format key, kwargs) shared by the two forwards of one step, dropped when it ends
        self._kwargs_cache: tuple[torch.Tensor, Any, dict[str, Any]] | None = None
        self._in_step = False
        # parts of the last wrapper (e.g. accelerate's DDP) step() ran the policy through; see _policy_parts_for
        self._wrapper_parts: LMParts | None = None

        if reference == "model":
            if ref_cache is not None:
                raise ValueError("ref_cache is only used with reference='precomputed'")
            if ref_quantization is not None:
                if ref_quantization not in (4, 8):
                    raise ValueError(f"ref_quantization must be 4, 8 or None, got {ref_quantization!r}")
                ref_model = quantize_model(ref_model if ref_model is not None else unwrap_ddp(model), ref_quantization)
            if ref_model is None:
                raise ValueError(
                    "reference='model' needs ref_model (or ref_quantization=8|4 to build a quantized copy of the "
                    "policy); use reference='adapter' for a PEFT policy or 'precomputed' with ref_cache"
                )
            if ref_model is model:
                raise ValueError("ref_model must be a separate model (the policy changes during training)")
            ref_model.eval()
            ref_model.requires_grad_(False)
            self.ref_model = ref_model
            self.ref_parts = resolve_lm(ref_model)
        elif reference == "adapter":
            if ref_model is not None or ref_cache is not None or ref_quantization is not None:
                raise ValueError("reference='adapter' takes no ref_model, ref_cache or ref_quantization")
            if not is_peft_model(unwrap_ddp(model)) or not hasattr(unwrap_ddp(model), "disable_adapter"):
                raise ValueError(
                    f"reference='adapter' needs a PEFT model (with disable_adapter()), got {type(model).__name__}"
                )
        else:  # precomputed
            if ref_quantization is not None:
                raise ValueError("ref_quantization is only used with reference='model'")
            if ref_cache is None:
                if ref_model is not None:
                    raise ValueError(
                        "reference='precomputed' without ref_cache reads the batch's ref_*_logps; "
                        "ref_model is only used to check a ref_cache"
                    )
            elif isinstance(ref_cache, (str, os.PathLike)):
                ref_cache = RefLogpCache.load(ref_cache, model=ref_model, settings=self.ref_settings)
            elif isinstance(ref_cache, RefLogpCache):
                ref_cache.check(model=ref_model, settings=self.ref_settings)
            else:
                raise TypeError(f"ref_cache must be a RefLogpCache or a path, got {type(ref_cache).__name__}")
            self.ref_cache = ref_cache

        self.sequence_parallel = self._build_sequence_parallel(sequence_parallel_size, sequence_parallel_group)
        if disable_dropout:
            _disable_dropout(model)
            if self.ref_model is not None:
                _disable_dropout(self.ref_model)
        if gradient_checkpointing:
            enable_gradient_checkpointing(unwrap_ddp(model))

    # ------------------------------------------------------------------------------------------------------------
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

    @staticmethod
    def _check_device(parts: LMParts, batch: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the key when a batch tensor is not on the model's device (before any work).

        The device is the first plain (non-``DTensor``) parameter's; FSDP2-sharded parameters are skipped (with CPU
        offloading they live on the host while the batch belongs on the accelerator), so a fully sharded model is
        not checked here."""
        param = next((p for p in parts.hf_model.parameters() if type(p).__name__ != "DTensor"), None)
        if param is None:
            return
        device = param.device
        for key in _DEVICE_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.device != device:
                raise ValueError(
                    f"batch[{key!r}] is on device {value.device} but the model ({type(parts.hf_model).__name__}) is "
                    f"on {device}; move the batch to the model's device first"
                )

    @staticmethod
    def _check_batch(batch: Mapping[str, Any]) -> int:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict from PreferenceCollator, got {type(batch).__name__}")
        missing = [k for k in _BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}; pass a batch made by fastdpo.PreferenceCollator")
        num_pairs = int(batch["num_pairs"])
        if num_pairs < 1:
            raise ValueError(f"batch['num_pairs'] must be >= 1, got {num_pairs}")
        m = batch["logp_index"].shape[0]
        for key in ("logp_labels", "logp_seq"):
            if batch[key].shape != (m,):
                raise ValueError(
                    f"batch[{key!r}] must have shape [{m}] like batch['logp_index'], got {list(batch[key].shape)}"
                )
        if batch["input_ids"].dim() != 2:
            raise ValueError(f"batch['input_ids'] must be [rows, length], got {list(batch['input_ids'].shape)}")
        return num_pairs

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

    def _head_options(self, parts: LMParts) -> dict[str, Any]:
        """The fused head's options both head passes (token statistics, grad-in-forward) take from ``parts`` and the
        engine."""
        own = {n: getattr(self, n) for n in ("temperature", "token_tile", "vocab_tile", "validate", "backend")}
        return {"softcap": parts.softcap, "logit_scale": parts.logit_scale, **own}

    def _sequence_logps(self, token_logps: torch.Tensor, batch: Mapping[str, Any], num_pairs: int) -> torch.Tensor:
        """``[2P]`` fp32 sequence log-probs (LD-weighted when ``ld_alpha`` is set) from ``[M]`` token log-probs."""
        from fastdpo.losses import ld_logps
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
        from fastdpo.head.function import linear_token_logprobs
        from fastdpo.segments import segment_sum

        num_pairs = self._check_batch(batch)
        parts = self._parts_for(model)
        self._check_device(parts, batch)
        ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        with ctx, _quiet_bnb():
            hidden, anchor = self._completion_hidden(parts, batch)
            sp_shard = (
                None
                if self.sequence_parallel is None
                else self.sequence_parallel.shard(batch, parts.hf_model, cache=True)
            )
            labels = batch["logp_labels"] if sp_shard is None else batch["logp_labels"].index_select(0, sp_shard.owned)

            def head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gather: Any) -> Any:
                h, weight, bias, head_ctx = _head_operands(h, weight, bias)
                with head_ctx:
                    return linear_token_logprobs(
                        h,
                        weight,
                        labels,
                        bias=bias,
                        return_entropy=token_stats,
                        return_mean_logit=token_stats,
                        return_argmax_hit=token_stats,
                        return_log_sum_p2=token_stats and self.use_weighting,
                        gather_context=gather,
                        **self._head_options(parts),
                    )

            stats = parts.call_head(head, hidden)  # under ZeRO-3 as a call of the head module (its hooks gather)
            if sp_shard is not None:  # this rank's tokens -> every token, summed over the group
                stats = self.sequence_parallel.gather_token_stats(stats, sp_shard, batch["logp_labels"].shape[0])
                if not self._in_step:
                    self.sequence_parallel.clear()
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

    @contextlib.contextmanager
    def _reference_context(self) -> Iterator[nn.Module]:
        if self.reference == "adapter":
            # keep_requires_grad: PEFT re-enables requires_grad on the parameters registered when the context exits
            # (under FSDP2 possibly the unsharded copies), see fastdpo.models.keep_requires_grad
            with keep_requires_grad(self.model), unwrap_ddp(self.model).disable_adapter():
                yield self.model
        else:
            assert self.ref_model is not None
            yield self.ref_model

    def reference_logps(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32, without gradient, in the engine's mode."""
        if self.reference == "precomputed":
            num_pairs = self._check_batch(batch)
            if self.ref_cache is not None:
                return self.ref_cache.lookup(batch)
            if "ref_chosen_logps" not in batch or "ref_rejected_logps" not in batch:
                raise ValueError(
                    "reference='precomputed' without ref_cache needs batch['ref_chosen_logps'] and "
                    "batch['ref_rejected_logps'] (rows with those columns, or pass ref_cache)"
                )
            device = batch["input_ids"].device
            out = []
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                t = torch.as_tensor(batch[key], dtype=torch.float32, device=device)
                if t.shape != (num_pairs,):
                    raise ValueError(f"batch[{key!r}] must have shape [{num_pairs}], got {list(t.shape)}")
                out.append(t)
            return out[0], out[1]
        with self._reference_context() as ref:
            out = self.compute_logps(ref, batch, with_grad=False, token_stats=self.policy_token_stats)
        return out["chosen_logps"], out["rejected_logps"]

    def reference_fingerprint(self) -> str:
        """Fingerprint of the reference (for cache stamps): the ref model, or the PEFT base under adapter mode."""
        if self.reference == "adapter":
            return model_fingerprint(unwrap_ddp(self.model), exclude_adapters=True)
        if self.reference == "model":
            assert self.ref_model is not None
            return model_fingerprint(self.ref_model)
        if self.ref_cache is None:
            raise ValueError("reference log-probs come from the batch: there is no reference model to fingerprint")
        return self.ref_cache.model_hash

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
        num_pairs = self._check_batch(batch)
        parts = self._policy_parts_for(model)
        if self.sequence_parallel is not None:
            self.sequence_parallel.check_wrapper(parts.model)
        self._check_device(parts, batch)
        self._in_step = True
        try:
            ref_c, ref_r = self.reference_logps(batch)
            if self.grad_in_forward and torch.is_grad_enabled():
                loss, metrics, pol_c, pol_r = self._step_grad_in_forward(batch, parts, num_pairs, ref_c, ref_r)
            else:
                loss, metrics, pol_c, pol_r = self._step(batch, parts, num_pairs, ref_c, ref_r, gather_totals or gather)
        finally:
            self._in_step = False
            self._kwargs_cache = None
            if self.sequence_parallel is not None:
                self.sequence_parallel.clear()
        if gather is not None:
            metrics.update(_gathered_reward_metrics(pol_c, pol_r, ref_c, ref_r, self.beta, gather))
        return loss, metrics

    def _step(
        self,
        batch: Mapping[str, Any],
        parts: LMParts,
        num_pairs: int,
        ref_c: torch.Tensor,
        ref_r: torch.Tensor,
        gather_totals: MetricGather | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(loss, metrics, policy chosen logps [P], policy rejected logps [P])`` through ``parts.model``."""
        from fastdpo.losses import preference_loss, wpo_weights

        pol = self.compute_logps(parts.model, batch, with_grad=True, token_stats=self.policy_token_stats)
        extra: dict[str, Any] = {}
        if self.use_weighting:
            w = wpo_weights(
                pol["token_logps"], pol["log_sum_p2"], batch["logp_seq"], 2 * num_pairs, validate=self.validate
            )
            extra = {"wpo_chosen_weights": w[:num_pairs], "wpo_rejected_weights": w[num_pairs:]}
        if self.ld_alpha is not None:
            extra["policy_chosen_nll_sum"] = pol["nll_sum"][:num_pairs]
            extra["policy_rejected_nll_sum"] = pol["nll_sum"][num_pairs:]
        loss, metrics = preference_loss(
            pol["chosen_logps"],
            pol["rejected_logps"],
            ref_c,
            ref_r,
            chosen_lengths=batch["chosen_lengths"],
            rejected_lengths=batch["rejected_lengths"],
            loss_config=self._sequence_loss_config,
            **extra,
        )
        if self.compute_token_metrics:
            metrics.update(token_metrics(pol, batch["logp_seq"], num_pairs, gather_totals=gather_totals))
        return loss, metrics, pol["chosen_logps"], pol["rejected_logps"]

    def _step_grad_in_forward(
        self, batch: Mapping[str, Any], parts: LMParts, num_pairs: int, ref_c: torch.Tensor, ref_r: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like :meth:`_step` with the head's gradients formed in the forward (no token metrics).

        LD-DPO enters as per-token weights of the sequence sums; LD-DPO's plain NLL sums and WPO's ``log sum p^2`` sums
        (from which :func:`~fastdpo.losses.preference_loss` forms the WPO weights) come from the per-group
        :class:`~fastdpo.head.SegmentStats` the head hands the loss."""
        from fastdpo.head.grad_in_forward import SegmentStats, linear_logprobs_loss_grad_in_forward
        from fastdpo.losses import dpo_metrics, ld_token_weights, partial_preference_loss, preference_loss
        from fastdpo.segments import pair_groups

        hidden, anchor = self._completion_hidden(parts, batch)
        lengths_c, lengths_r = batch["chosen_lengths"], batch["rejected_lengths"]
        config = self._sequence_loss_config
        seg = batch["logp_seq"]
        num_seqs = 2 * num_pairs
        token_weights = None
        if self.ld_alpha is not None:
            token_weights = ld_token_weights(
                batch["logp_pos"], seg, lengths_c, lengths_r, self.ld_alpha, validate=self.validate
            )
        with_stats = self.use_weighting or self.ld_alpha is not None

        def extras(stats: SegmentStats | None, k: int) -> dict[str, torch.Tensor]:
            """preference_loss kwargs of a group's sequences (``k`` chosen first, then their rejected)."""
            if stats is None:
                return {}
            out: dict[str, torch.Tensor] = {}
            if self.ld_alpha is not None:
                out["policy_chosen_nll_sum"] = -stats.logp_sum[:k]
                out["policy_rejected_nll_sum"] = -stats.logp_sum[k:]
            if stats.log_sum_p2_sum is not None:  # WPO
                out["policy_chosen_log_sum_p2"] = stats.log_sum_p2_sum[:k]
                out["policy_rejected_log_sum_p2"] = stats.log_sum_p2_sum[k:]
            return out

        def pair_loss(
            seq_logps: torch.Tensor, seg_ids: torch.Tensor, stats: SegmentStats | None = None
        ) -> torch.Tensor:
            # seg_ids == [i, P + i]: one pair's contribution to the batch-mean loss (batch totals for its mean)
            i = seg_ids[:1].to(ref_c.device)
            num_chosen_tokens = lengths_c.to(seq_logps.dtype).sum().clamp(min=1.0) if sft else None
            return partial_preference_loss(
                seq_logps[0:1],
                seq_logps[1:2],
                ref_c.index_select(0, i),
                ref_r.index_select(0, i),
                loss_config=config,
                num_pairs=num_pairs,
                num_chosen_tokens=num_chosen_tokens,
                chosen_lengths=lengths_c.index_select(0, i),
                rejected_lengths=lengths_r.index_select(0, i),
                **extras(stats, 1),
            )

        def batch_loss(
            seq_logps: torch.Tensor, seg_ids: torch.Tensor, stats: SegmentStats | None = None
        ) -> torch.Tensor:
            ids = seg_ids.to(seq_logps.device)

            def ordered(t: torch.Tensor) -> torch.Tensor:
                return torch.empty_like(t).index_copy(0, ids, t)

            if stats is not None:
                lsp2 = stats.log_sum_p2_sum
                stats = SegmentStats(ordered(stats.logp_sum), None if lsp2 is None else ordered(lsp2))
            loss, _ = preference_loss(
                *ordered(seq_logps).split(num_pairs),
                ref_c,
                ref_r,
                chosen_lengths=lengths_c,
                rejected_lengths=lengths_r,
                loss_config=config,
                **extras(stats, num_pairs),
            )
            return loss

        sft = "sft" in config.loss_type
        if config.pair_local:
            loss_fn, groups = pair_loss, pair_groups(num_pairs)
        else:  # batch-coupled (sorting over the batch, WPO-weighted SFT): one group of all sequences
            loss_fn, groups = batch_loss, None

        def head(
            h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gather: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            h, weight, bias, head_ctx = _head_operands(h, weight, bias)
            with head_ctx:
                return linear_logprobs_loss_grad_in_forward(
                    h,
                    weight,
                    batch["logp_labels"],
                    seg,
                    num_seqs,
                    loss_fn,
                    bias=bias,
                    groups=groups,
                    token_weights=token_weights,
                    segment_stats=with_stats,
                    segment_log_sum_p2=self.use_weighting,
                    gather_context=gather,
                    **self._head_options(parts),
                )

        loss, seq = parts.call_head(head, hidden)
        if anchor is not None and anchor.requires_grad:
            loss = loss + anchor  # + exactly 0: keeps the wrapper's output hooks (FSDP2 root) in backward
        metrics = dpo_metrics(seq[:num_pairs], seq[num_pairs:], ref_c, ref_r, self.beta)
        return loss, metrics, seq[:num_pairs], seq[num_pairs:]


def _head_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, contextlib.AbstractContextManager]:
    """``(hidden, weight, bias, context)`` to call the fused head with, honouring an enclosing ``torch.autocast``.

    Under autocast (TRL's default bf16/fp16 mixed precision) the model's own ``nn.Linear`` head would run in the
    autocast dtype; so does the fused head: its floating operands (fp32 master weights, fp32 hidden states) are cast
    to that dtype -- differentiably, the gradients reach the fp32 parameters -- and the head runs inside ``context``,
    autocast off, so its forward GEMMs and its backward recompute use one precision (under autocast, some of the
    head's internal GEMMs would be recast and others not). Reductions stay fp32 as always. Without autocast the
    operands are returned unchanged with a null context.
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        # like autocast itself: floating tensors other than float64 go to the autocast dtype
        return t if t is None or t.dtype in (dtype, torch.float64) or not t.is_floating_point() else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device_type, enabled=False)


def token_metric_totals(
    logps: Mapping[str, Any], logp_seq: torch.Tensor, num_pairs: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (sum, count)}`` behind :func:`token_metrics`: detached 0-dim fp32 sums of the head's statistics over
    the selected completion tokens and the fp32 token counts (what data-parallel ranks add up before dividing)."""
    chosen = logp_seq < num_pairs
    rejected = ~chosen

    def masked_total(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.detach().float()
        total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
        return total, mask.sum().to(values.dtype)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if logps.get("mean_logit") is not None:
        out[LOGITS_CHOSEN] = masked_total(logps["mean_logit"], chosen)
        out[LOGITS_REJECTED] = masked_total(logps["mean_logit"], rejected)
    if logps.get("entropy") is not None:
        out[ENTROPY] = masked_total(logps["entropy"], torch.ones_like(chosen))
    if logps.get("argmax_hit") is not None:
        out[MEAN_TOKEN_ACCURACY] = masked_total(logps["argmax_hit"].float(), chosen)
    return out


def token_metrics(
    logps: Mapping[str, Any], logp_seq: torch.Tensor, num_pairs: int, *, gather_totals: MetricGather | None = None
) -> dict[str, torch.Tensor]:
    """TRL's token-level metrics from the head's statistics (detached 0-dim fp32 tensors, no host sync).

    ``logits/chosen`` / ``logits/rejected``: token-weighted mean over chosen / rejected completion tokens of the
    vocabulary-mean logit; ``entropy``: token-weighted mean over all completion tokens; ``mean_token_accuracy``:
    fraction of chosen completion tokens whose argmax is the label. Empty selections give 0 (as TRL).
    ``gather_totals`` (see :meth:`DPOEngine.step`) makes them token-weighted over every data-parallel rank: the
    ``[1, 2k]`` (sum, count) totals are gathered in one call and their rows summed before dividing, as TRL does.
    """
    totals = token_metric_totals(logps, logp_seq, num_pairs)
    if gather_totals is not None and totals:
        names = list(totals)
        packed = torch.stack([t for name in names for t in totals[name]]).unsqueeze(0)
        summed = gather_totals(packed).sum(0)
        totals = {name: (summed[2 * i], summed[2 * i + 1]) for i, name in enumerate(names)}
    return {name: total / count.clamp(min=1) for name, (total, count) in totals.items()}


def _gathered_reward_metrics(
    pol_c: torch.Tensor,
    pol_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    gather: MetricGather,
) -> dict[str, torch.Tensor]:
    """:func:`fastdpo.losses.dpo_metrics` over every rank's pairs: the four ``[P]`` log-prob vectors are gathered as
    one ``[P, 4]`` tensor (one collective) into ``[sum P, 4]``."""
    from fastdpo.losses import dpo_metrics

    stacked = torch.stack([t.detach().float() for t in (pol_c, pol_r, ref_c, ref_r)], dim=1)
    pc, pr, rc, rr = gather(stacked).unbind(1)
    return dpo_metrics(pc, pr, rc, rr, beta)


@contextlib.contextmanager
def _quiet_bnb() -> Iterator[None]:
    """Silence bitsandbytes' per-call fp32->fp16 cast notice of 8-bit matmuls (expected for a reference model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
        yield
