"""Model glue: split any Hugging Face causal LM into a backbone and an LM head the fused kernels can use.

The engine never materializes the ``[B, T, V]`` logits. It runs the model's *own* forward (through any DDP / FSDP2
wrapper, so their hooks fire: DDP's gradient reducer, FSDP2's root unshard and reduce-scatter) with
``logits_to_keep`` an empty index tensor, so the output projection runs on zero positions; a forward hook on the
*backbone* (the decoder stack, final norm included) captures the last hidden states. The engine picks the completion
positions and hands them with the output-embedding weight to :func:`fastdpo.head.linear_token_logprobs`.
For that to give the model's own log-probs, the head's extras have to be honoured too:

* ``final_logit_softcapping`` (Gemma-2/3): ``z = cap * tanh(z / cap)``;
* Cohere-style ``logit_scale`` (``logits * model.logit_scale``), ``output_multiplier``/``lm_head_multiplier``, and
  Granite's ``logits_scaling`` (``logits / config.logits_scaling``);
* a bias on the output projection, tied input/output embeddings (nothing to do: the head weight *is* the embedding
  parameter, so gradients reach it);
* PEFT wrappers: LoRA layers inside the backbone work unchanged; a LoRA adapter or ``modules_to_save`` copy on the LM
  head itself is folded into an effective ``(weight, bias)`` at call time, so ``disable_adapter()`` is respected.

Sharded parameters (:meth:`LMParts.call_head`): an FSDP2 ``DTensor`` head weight is gathered once per call by the
fused head (``fastdpo.head``); under DeepSpeed ZeRO-3, where a parameter holds 0 elements outside its
module's forward, the fused head runs *as a call of the head module*, so ZeRO's own module hooks all-gather the head's
parameters once for the fused forward and once for its backward (ZeRO's pre-backward hook fires on the head's
outputs before the fused backward recomputes its tiles), and the full-size gradient is accumulated while the weight is
gathered, before ZeRO's post-backward release -- so ZeRO's gradient hooks reduce-scatter it into the partitioned
gradients like any module's. The model's own projection of zero positions is skipped under ZeRO-3 (it would cost an
extra all-gather of the head for nothing).

Also here: :func:`max_logit_error`, a check that the split reproduces the model's own logits. The bitsandbytes
reference copies are in :mod:`fastdpo.quantize`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "LMParts",
    "resolve_lm",
    "unwrap_peft",
    "unwrap_ddp",
    "is_peft_model",
    "head_weight_bias",
    "is_zero3_param",
    "max_logit_error",
    "enable_gradient_checkpointing",
    "disable_dropout",
    "keep_requires_grad",
]


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (anything exposing ``get_base_model`` and ``peft_config``)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """Return the Hugging Face model inside a PEFT wrapper (LoRA layers stay injected), or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` / DeepSpeed ``DeepSpeedEngine`` wrapper
    (``.module``), or ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)) or is_deepspeed_engine(model):
        model = model.module
    return model


def is_deepspeed_engine(model: Any) -> bool:
    """True for a DeepSpeed ``DeepSpeedEngine`` (what ``deepspeed.initialize`` / ``accelerate`` wrap a model in).

    Never imports deepspeed: an engine can only exist once deepspeed has been imported."""
    runtime = sys.modules.get("deepspeed.runtime.engine")
    engine_cls = getattr(runtime, "DeepSpeedEngine", None) if runtime is not None else None
    return engine_cls is not None and isinstance(model, engine_cls)


def is_zero3_param(param: Any) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 partitions (``ds_id``/``ds_status``): it holds 0 elements except while
    gathered (inside its module's forward/backward, or a ``deepspeed.zero.GatheredParameters`` context)."""
    return isinstance(param, torch.Tensor) and hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _accepts_logits_to_keep(hf_model: nn.Module) -> bool:
    try:
        params = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def head_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective ``(weight [V, D], bias [V] or None)`` of an output projection, as it acts right now.

    Handles ``nn.Linear`` (and subclasses), PEFT ``ModulesToSaveWrapper`` (the active copy, or the original when
    adapters are disabled) and PEFT LoRA layers (``W + scaling * B @ A`` summed over active adapters, differentiable
    wrt the LoRA factors). Raises ``TypeError`` for a quantized or non-linear head and ``ValueError`` for a LoRA
    variant that cannot be folded (DoRA etc., or active LoRA dropout in training mode).
    """
    if _is_modules_to_save(module):
        if module.disable_adapters or not module.active_adapters:
            return head_weight_bias(module.original_module)
        return head_weight_bias(module.modules_to_save[module.active_adapter])
    if _is_lora_layer(module):
        weight, bias = head_weight_bias(module.base_layer)
        if module.disable_adapters or getattr(module, "merged", False):
            return weight, bias
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}):
                raise ValueError(
                    f"the LM head carries a LoRA variant ({type(module.lora_variant[name]).__name__}) for adapter "
                    f"{name!r}; only plain LoRA on the output embedding can be folded into the fused head"
                )
            dropout = module.lora_dropout[name]
            if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                raise ValueError(
                    f"LoRA adapter {name!r} on the LM head has lora_dropout={dropout.p} in training mode; dropout "
                    "on the head input cannot be folded into the fused head (use lora_dropout=0 for the head, or "
                    "DPOEngine(disable_dropout=True))"
                )
            lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
            if any(_is_dtensor(t) for t in (weight, lora_a, lora_b)):
                # FSDP2 with PEFT: the base weight and the adapter factors may be sharded DTensors or plain tensors
                # (mixed); fold on full tensors -- each DTensor gathered once, its gradient reduce-scattered back
                weight, lora_a, lora_b = (_full_tensor(t) for t in (weight, lora_a, lora_b))
                bias = None if bias is None else _full_tensor(bias)
            delta = lora_b @ lora_a
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            weight = weight + (delta * module.scaling[name]).to(weight.dtype)
            if getattr(module.lora_B[name], "bias", None) is not None:
                extra = _full_tensor(module.lora_B[name].bias) * module.scaling[name]
                bias = extra.to(weight.dtype) if bias is None else bias + extra.to(bias.dtype)
        return weight, bias
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"cannot use {type(module).__name__} as an LM head: expected a linear layer with a 2-D weight [V, D]"
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"the LM head weight is {weight.dtype} ({type(weight).__name__}); the fused head needs a dense floating "
            "weight — keep the output embedding unquantized (quantize_model does)"
        )
    bias = getattr(module, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for ``t``: a DTensor is all-gathered (differentiably, see
    :func:`fastdpo.head.gather._gather_weight`), anything else returned as is."""
    if not _is_dtensor(t):
        return t
    from fastdpo.head.gather import _gather_weight

    return _gather_weight(t)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


_T = TypeVar("_T")


@dataclass
class LMParts:
    """A causal LM split into what the fused head needs.

    Attributes:
        model: the model as given (possibly a ``PeftModel``, possibly inside ``DistributedDataParallel``); its
            ``__call__`` runs the forward, so the wrappers' hooks fire.
        hf_model: the Hugging Face ``*ForCausalLM`` inside (DDP and PEFT wrappers removed, LoRA layers still
            injected).
        backbone: module mapping ``input_ids`` (+ attention kwargs) to ``last_hidden_state [B, T, D]`` — the final
            norm included, the output projection excluded.
        head: the output-embedding module (``get_output_embeddings()``).
        softcap: final-logit soft-capping value or None.
        logit_scale: multiplier applied to the logits before soft-capping (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``); 1.0 for most models.
        through_model: True when :meth:`forward` runs ``model``'s own forward with ``logits_to_keep`` empty (the
            model accepts ``logits_to_keep``); False when it calls the backbone directly (only for unwrapped models).
        needs_anchor: True when FSDP2 (``fully_shard``) managed the model when it was resolved (:meth:`forward` also
            checks again: a model sharded later gets the anchor too): :meth:`forward` then returns the anchor that
            keeps the root's output hooks in backward (see there); otherwise no anchor (it would cost a dense zero
            ``[V, D]`` gradient of the output embedding in backward).
    """

    model: nn.Module
    hf_model: nn.Module
    backbone: nn.Module
    head: nn.Module
    softcap: float | None
    logit_scale: float
    through_model: bool = True
    needs_anchor: bool = False

    def head_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective ``(weight [V, D], bias [V] | None)`` now (respects PEFT ``disable_adapter()``)."""
        return head_weight_bias(self.head)

    @property
    def zero3(self) -> bool:
        """Whether DeepSpeed ZeRO-3 partitions the output embedding's parameters. Checked on every use: ZeRO converts
        the parameters in place when ``deepspeed.initialize`` runs, which may come after these parts were resolved
        (a trainer builds its engine before ``accelerate`` prepares the model)."""
        return any(is_zero3_param(p) for p in self.head.parameters())

    def call_head(self, fn: Callable[..., _T], hidden: torch.Tensor) -> _T:
        """``fn(hidden, weight, bias, gather_context)`` with the head's effective ``(weight [V, D], bias [V] | None)``.

        Without ZeRO-3 this is a plain call (``gather_context`` is ``None``; an FSDP2 ``DTensor`` weight is gathered
        by the fused head itself). Under DeepSpeed ZeRO-3 ``fn`` runs as the forward of the head module
        (``self.head(hidden)`` with its ``forward`` temporarily replaced by ``fn``), so ZeRO's module hooks gather
        the head's parameters (one all-gather) for ``fn`` and release them after; they also wrap ``fn``'s outputs
        so that ZeRO's pre-backward hook gathers the parameters again *before* the fused head's backward (which
        recomputes tiles from the weight) and releases them only after the gradients of ``hidden`` are formed,
        i.e. after autograd accumulated the full-size weight gradient (``AccumulateGrad`` runs first) and ZeRO's
        gradient hook reduce-scattered it into the partitioned gradient. Parameters of the head's submodules (a
        PEFT LoRA / ``modules_to_save`` head) are registered as external parameters of the head module
        (``deepspeed.zero.register_external_parameter``) so the same hooks gather them. ``gather_context`` is then a
        check that the parameters are gathered (a second backward through one step, e.g. ``retain_graph=True``,
        gets a clear ``RuntimeError`` instead of a 0-element weight).
        """
        if not self.zero3:
            return fn(hidden, *self.head_weight_bias(), None)
        params = _zero3_head_params(self.head)

        def forward(h: torch.Tensor) -> _T:
            weight, bias = self.head_weight_bias()
            return fn(h, weight, bias, functools.partial(_zero3_gathered, params))

        with _replaced_forward(self.head, forward):
            return self.head(hidden)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``input_ids [R, L]`` (+ ``attention_mask``/``position_ids``/...) -> ``(hidden [R, L, D], anchor)``.

        Runs ``model(...)`` — through the DDP / FSDP2 / PEFT wrappers, so their forward hooks fire — with
        ``logits_to_keep`` an empty index tensor (the output projection sees zero positions, no logits are
        materialized) and captures the backbone's last hidden state with a forward hook. ``anchor`` (only when
        ``needs_anchor``, i.e. under FSDP2) is a 0-dim tensor equal to exactly 0 (the sum of the empty logits) that
        carries the model output's autograd edge: add it to the loss so hooks registered on the model's outputs
        (FSDP2's root pre-backward) run in backward. It is ``None`` otherwise: its backward would form a dense zero
        ``[V, D]`` output-embedding gradient next to the fused head's.
        ``use_cache`` is forced off (training/scoring never needs a KV cache).
        """
        if not self.through_model:
            return _last_hidden(self.backbone(input_ids=input_ids, use_cache=False, **kwargs)), None
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(_last_hidden(output))

        handle = self.backbone.register_forward_hook(hook)
        try:
            keep = torch.empty(0, dtype=torch.long, device=input_ids.device)
            # ZeRO-3, or FSDP2 sharding the head in a group of its own, would all-gather the head's weight to
            # project zero positions: the head is left out of this forward (the fused head gathers it, see call_head)
            skip = self.zero3 or _head_in_own_fsdp2_group(self.head)
            with _head_skipped(self.hf_model, self.head) if skip else contextlib.nullcontext():
                out = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep, **kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"the backbone ({type(self.backbone).__name__}) ran {len(captured)} times in one forward of "
                f"{type(self.hf_model).__name__}; expected exactly once"
            )
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        anchor = None
        # FSDP2 may shard the model after these parts were resolved (accelerate prepares it in place in train())
        fsdp2 = self.needs_anchor or any(_is_fsdp2(m) for m in self.model.modules())
        if fsdp2 and isinstance(logits, torch.Tensor) and logits.numel() == 0:
            anchor = logits.sum()
        return captured[0], anchor

    def hidden_states(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Last hidden states ``[R, L, D]`` for ``input_ids [R, L]`` (see :meth:`forward`; never materializes
        logits)."""
        return self.forward(input_ids, **kwargs)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits from hidden states exactly as the fused head defines them (for checks; materializes ``V``)."""
        weight, bias = self.head_weight_bias()
        z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias) * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


@contextlib.contextmanager
def _replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside (an instance attribute shadowing the class's method); the module's
    hooks still run around it when the module is called."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


@contextlib.contextmanager
def _head_skipped(hf_model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Inside, the submodule ``head`` of ``hf_model`` is replaced by an ``nn.Identity`` (its call then returns the
    ``[R, 0, D]`` hidden states of the zero kept positions as the "logits"; nothing uses them)."""
    parent, name = None, ""
    for module_name, module in hf_model.named_modules():
        if module is head:
            parent_name, _, name = module_name.rpartition(".")
            parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
            break
    if parent is None:  # pragma: no cover - get_output_embeddings() returns a submodule of the model
        yield
        return
    parent._modules[name] = nn.Identity()
    try:
        yield
    finally:
        parent._modules[name] = head


def _head_in_own_fsdp2_group(head: nn.Module) -> bool:
    """True when FSDP2 shards the head (or its inner linear layer) in groups holding nothing outside the head: its
    weight is then a sharded ``DTensor`` after the model's forward (when resharded), which the fused head gathers
    once itself. (A head sharing a group with other modules -- accelerate's ``[norm, lm_head]`` tail, the root --
    is unsharded by that group and must stay in the forward so the group's hooks run as FSDP2 expects.)"""
    owners = [m for m in head.modules() if _is_fsdp2(m)]
    if not owners:
        return False
    inside = {id(m) for m in head.modules()}
    return all(id(m) in inside for owner in owners for m in owner._get_fsdp_state()._modules)


def _zero3_head_params(head: nn.Module) -> list[nn.Parameter]:
    """The head's ZeRO-3 parameters; those of its submodules (PEFT wrappers) are registered as external parameters of
    ``head`` (idempotent), so that ZeRO's hooks on ``head`` gather them."""
    import deepspeed

    params = [p for p in head.parameters() if is_zero3_param(p)]
    own = {id(p) for p in head.parameters(recurse=False)}
    for p in params:
        if id(p) not in own:
            deepspeed.zero.register_external_parameter(head, p)
    return params


@contextlib.contextmanager
def _zero3_gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Check that ZeRO-3 has gathered ``params`` (the fused head's forward and backward run only then)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p.ds_id for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if missing:
        raise RuntimeError(
            f"DeepSpeed ZeRO-3: the LM head parameters {missing} are not gathered for the fused head. ZeRO gathers "
            "them once for the forward and once for the backward of a step; a second backward through the same step "
            "(retain_graph=True, several losses on one forward) is not supported under ZeRO-3"
        )
    yield


def _last_hidden(out: Any) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _find_backbone(hf_model: nn.Module) -> nn.Module:
    getter = getattr(hf_model, "get_decoder", None)
    backbone = None
    if callable(getter):
        try:
            backbone = getter()
        except (AttributeError, NotImplementedError, ValueError):
            backbone = None
    if backbone is None or backbone is hf_model:
        prefix = getattr(hf_model, "base_model_prefix", "") or ""
        backbone = getattr(hf_model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is hf_model:
        raise ValueError(
            f"cannot find the backbone of {type(hf_model).__name__}: neither get_decoder() nor base_model_prefix "
            f"({getattr(hf_model, 'base_model_prefix', None)!r}) names a submodule distinct from the model"
        )
    return backbone


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _logit_scale(hf_model: nn.Module, config: Any) -> float:
    """Multiplier applied to the head's output before soft-capping, from the first source that is set:
    ``config.logit_scale`` (Cohere) or the model's ``logit_scale`` attribute, ``config.output_multiplier``,
    ``config.lm_head_multiplier`` (Falcon-H1), ``config.logits_scaling`` (divides: Granite, MiniCPM3; multiplies:
    HyperCLOVA X) — the same sources TRL's fused LM head reads."""
    for value in (
        getattr(config, "logit_scale", None),
        getattr(hf_model, "logit_scale", None),
        getattr(config, "output_multiplier", None),
        getattr(config, "lm_head_multiplier", None),
    ):
        number = _number(value)
        if number is not None:
            return number
    scaling = _number(getattr(config, "logits_scaling", None))
    if scaling is not None:
        return scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return 1.0


def resolve_lm(model: nn.Module) -> LMParts:
    """Split a Hugging Face causal LM (optionally PEFT-wrapped, in ``DistributedDataParallel`` or sharded with FSDP2
    ``fully_shard``) into backbone, head and logit transforms.

    Raises ``TypeError`` when ``model`` has no output embedding, ``ValueError`` when no backbone can be found, a
    logit transform is invalid, or a wrapped (DDP/FSDP2) model's forward does not accept ``logits_to_keep``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap_ddp(model)
    hf_model = unwrap_peft(inner)
    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(
            f"model ({type(hf_model).__name__}) has no output embedding (get_output_embeddings() is None); "
            "pass a *ForCausalLM model"
        )
    backbone = _find_backbone(hf_model)
    config = _text_config(getattr(hf_model, "config", None))

    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"model config final_logit_softcapping must be a positive number, got {softcap}")

    scale = _logit_scale(hf_model, config)
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"model logit scale must be finite and non-zero, got {scale}")
    through_model = _accepts_logits_to_keep(hf_model)
    if not through_model and (inner is not model or any(_is_fsdp2(m) for m in hf_model.modules())):
        raise ValueError(
            f"{type(hf_model).__name__}.forward does not accept logits_to_keep, so fastdpo cannot run it through the "
            f"{type(model).__name__}/FSDP wrapper without materializing the logits; wrapped models need a causal LM "
            "whose forward takes logits_to_keep (transformers >= 4.50 models do)"
        )
    return LMParts(
        model=model,
        hf_model=hf_model,
        backbone=backbone,
        head=head,
        softcap=softcap,
        logit_scale=scale,
        through_model=through_model,
        needs_anchor=any(_is_fsdp2(m) for m in model.modules()),
    )


@torch.no_grad()
def max_logit_error(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> float:
    """Max |model(input_ids).logits - head(backbone(input_ids))| — 0 up to rounding when the split is faithful.

    ``input_ids`` LongTensor ``[B, T]``; extra ``kwargs`` go to both forwards. Use it once per new architecture.
    """
    parts = resolve_lm(model)
    full = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
    ours = parts.logits(parts.hidden_states(input_ids, **kwargs)).float()
    return float((full - ours).abs().max())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing (``use_reentrant=False``: works with frozen embeddings/PEFT).

    Calls ``model.activation_checkpointing_enable`` (transformers >= 5.2x) or, on older versions,
    ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``. Like every HF
    checkpointing it is active only while the model is in training mode.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise TypeError(f"{type(model).__name__} does not support gradient checkpointing")
    enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def keep_requires_grad(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` as it was on entry (use around PEFT's ``disable_adapter()``).

    PEFT disables adapters by setting ``requires_grad=False`` on the adapter parameters registered at that moment
    and re-enables them on the parameters registered when the context exits. Under FSDP2 those are different tensors
    for a group that stays unsharded after the forward (the root, accelerate's ``[norm, lm_head]`` tail): the sharded
    ``DTensor`` parameters -- the ones the optimizer holds, from which every later unsharded copy takes its flag --
    would stay frozen, and the adapters in that group would stop training after the first reference pass.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def disable_dropout(model: nn.Module) -> None:
    """Set ``p = 0`` on every ``nn.Dropout`` in ``model`` (as TRL's ``disable_dropout=True`` does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def __getattr__(name: str) -> Any:
    """``fastdpo.models.quantize_model`` / ``quantized_linear``: their old import path (they live in
    :mod:`fastdpo.quantize`, which imports this module)."""
    if name in ("quantize_model", "quantized_linear"):
        from fastdpo import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
