"""``FastDPOTrainer``: TRL 1.16's ``DPOTrainer`` with fastdpo's engine underneath.

Drop-in: same constructor (model, ref_model, ``DPOConfig``, datasets, processing class, PEFT config, ...), same data
pipeline up to tokenization (TRL's ``_prepare_dataset``: prompt extraction, EOS, chat templates, tokenization), same
losses (every ``loss_type``, ``loss_weights``, ``f_divergence_type``, ``label_smoothing``, ``ld_alpha``,
``use_weighting``, ``discopop_tau``) and the same metrics under TRL's names (``rewards/*``, ``logps/*``,
``logits/*``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``). What changes is the step:

* batches are collated by :class:`fastdpo.collator.PreferenceCollator` (``packing="pad"`` reproduces TRL's batch
  token for token; ``"padding_free"`` -- also selected by ``DPOConfig(padding_free=True)``, which TRL 1.16 ignores --
  and ``"prefix_shared"`` run each prompt once per pair);
* :class:`fastdpo.engine.DPOEngine` runs backbone -> completion positions only -> fused LM head, so no ``[B, T, V]``
  logits are ever built;
* the reference is a separate model (``reference="model"``), the PEFT base with adapters disabled (``"adapter"``),
  or log-probs precomputed into the dataset (``precompute_ref_log_probs=True`` -> ``"precomputed"``).

Options TRL has and fastdpo does not support raise ``NotImplementedError`` naming the option (never a silent
fallback): vision-language models/datasets, ``compute_metrics`` (needs logits), Mixture-of-Experts auxiliary loss
(``router_aux_loss_coef``), prompt-learning PEFT methods (virtual tokens), a custom non-fastdpo ``data_collator`` and
multi-process (DDP/FSDP/DeepSpeed) training.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from fastdpo.collator import PreferenceCollator
from fastdpo.engine import DPOEngine
from fastdpo.models import is_peft_model

__all__ = ["FastDPOTrainer"]

_PACKINGS = ("pad", "padding_free", "prefix_shared")
# the order TRL 1.16 fills ``self._metrics`` in (log lines read the same)
_METRIC_ORDER = ("entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
                 "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class _TrainerCollator:
    """Data collator for the trainer: a :class:`PreferenceCollator` built on first use from the trainer's tokenizer
    (TRL resolves the processing class inside ``DPOTrainer.__init__``) and the ``DPOConfig`` truncation options.

    Rows are TRL's tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optionally ``ref_chosen_logps``
    / ``ref_rejected_logps``); the batch is the collator's (see :mod:`fastdpo.collator`) plus ``num_tokens`` (int:
    prompt+completion tokens of both sequences of every pair after truncation, what TRL counts in ``num_tokens``).
    """

    def __init__(self, trainer: FastDPOTrainer, args: DPOConfig, packing: str) -> None:
        self._trainer = trainer
        self._args = args
        self.packing = packing
        self._collator: PreferenceCollator | None = None

    @property
    def collator(self) -> PreferenceCollator:
        if self._collator is None:
            args = self._args
            pad_to = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
            self._collator = PreferenceCollator(
                self._trainer._tokenizer, max_length=args.max_length, truncation_mode=args.truncation_mode,
                packing=self.packing, pad_to_multiple_of=pad_to,
            )
        return self._collator

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        tokens = int(batch["attention_mask"].sum())
        if self.packing == "prefix_shared":  # TRL feeds each pair's prompt twice (once per completion)
            tokens += int((batch["token_role"] == 0).sum())
        batch["num_tokens"] = tokens
        return batch


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` (TRL 1.16) whose loss path is :class:`fastdpo.engine.DPOEngine`.

    Takes every argument of ``DPOTrainer`` plus, keyword-only:

    Args:
        packing: ``"pad"`` (TRL's layout), ``"padding_free"`` or ``"prefix_shared"``. Default: ``"padding_free"``
            when ``args.padding_free`` else ``"pad"``.
        grad_in_forward: form the LM-head gradients during the forward (3 GEMMs instead of 4; see
            :class:`~fastdpo.engine.DPOEngine`). The token metrics (``logits/*``, ``entropy``,
            ``mean_token_accuracy``) are then not logged; not with ``use_weighting`` or ``ld_alpha``.
        attn_impl: attention path for packed batches (:func:`fastdpo.attention.build_attention_kwargs`).
        chunk_size, backend: forwarded to the fused head (``backend="auto"``: Triton on CUDA, PyTorch elsewhere).

    The loss of a step equals ``DPOTrainer``'s on the same batch (fp32 rounding aside), and ``self._metrics``
    receives the same keys, so logging, callbacks and checkpointing behave as with ``DPOTrainer``.

    Raises:
        NotImplementedError: an option TRL supports and fastdpo does not (named in the message).
        ValueError: an invalid ``packing`` (or TRL's own validation errors).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        packing: str | None = None,
        grad_in_forward: bool = False,
        attn_impl: str = "auto",
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-FastDPO")
        self._check_supported(args, data_collator, train_dataset, processing_class, compute_metrics, peft_config)
        if isinstance(data_collator, PreferenceCollator):
            if packing is not None and packing != data_collator.packing:
                raise ValueError(f"packing={packing!r} disagrees with the data_collator's packing "
                                 f"{data_collator.packing!r}")
            packing = data_collator.packing
        if packing is None:
            packing = "padding_free" if args.padding_free else "pad"
        if packing not in _PACKINGS:
            raise ValueError(f"packing must be one of {_PACKINGS}, got {packing!r}")
        self._fast_engine: DPOEngine | None = None
        self._engine_options = {"grad_in_forward": bool(grad_in_forward), "attn_impl": attn_impl,
                                "chunk_size": chunk_size, "backend": backend}
        self._ref_adapter: str | None = None  # a PEFT "ref" adapter (re-training an existing adapter), see below
        if data_collator is None:
            data_collator = _TrainerCollator(self, args, packing)
        # TRL 1.16 warns that padding_free is unavailable and falls back to padding; here it selects our packing, so
        # keep TRL from warning (and restore the user's flag afterwards).
        padding_free = args.padding_free
        args.padding_free = False
        try:
            super().__init__(
                model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config,
            )
        finally:
            args.padding_free = padding_free
        self.packing = packing
        if self.accelerator.num_processes > 1:
            raise NotImplementedError(
                f"FastDPOTrainer runs in a single process for now ({self.accelerator.num_processes} processes "
                f"launched, distributed type {self.accelerator.distributed_type}): DPOEngine itself trains DDP and FSDP2 "
                "models (see tests/test_distributed.py), but the trainer's multi-process wiring (accelerate-prepared "
                "wrappers, DeepSpeed) is not validated yet. Use DPOEngine in your own loop, or trl.DPOTrainer."
            )
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "router_aux_loss_coef: the Mixture-of-Experts load-balancing loss is not supported by FastDPOTrainer "
                "(set DPOConfig(router_aux_loss_coef=0.0) to train without it)"
            )
        self._engine()  # build now: configuration errors surface at construction

    # ------------------------------------------------------------------------------------------------ validation
    @staticmethod
    def _check_supported(args: DPOConfig, data_collator: Any, train_dataset: Any, processing_class: Any,
                         compute_metrics: Callable | None, peft_config: Any) -> None:
        from transformers import ProcessorMixin

        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a trl.DPOConfig, got {type(args).__name__}")
        if compute_metrics is not None:
            raise NotImplementedError(
                "compute_metrics: FastDPOTrainer never builds the [batch, seq, vocab] logits that compute_metrics "
                "receives; the DPO metrics (rewards/*, logps/*, logits/*, entropy, mean_token_accuracy) are logged "
                "for train and eval"
            )
        if isinstance(processing_class, ProcessorMixin):
            raise NotImplementedError("vision-language models (a ProcessorMixin processing_class) are not supported "
                                      "by FastDPOTrainer")
        if train_dataset is not None:
            with contextlib.suppress(StopIteration, TypeError):
                sample = next(iter(train_dataset))
                if isinstance(sample, Mapping) and ("image" in sample or "images" in sample):
                    raise NotImplementedError("vision datasets ('image'/'images' columns) are not supported by "
                                              "FastDPOTrainer")
        if data_collator is not None and not isinstance(data_collator, (PreferenceCollator, _TrainerCollator)):
            raise NotImplementedError(
                f"data_collator: FastDPOTrainer needs batches from fastdpo.PreferenceCollator (got "
                f"{type(data_collator).__name__}); pass none (the trainer builds one from DPOConfig) or a "
                "PreferenceCollator"
            )
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise NotImplementedError(
                f"peft_config: prompt-learning PEFT methods ({type(peft_config).__name__}) prepend virtual tokens, "
                "which FastDPOTrainer's token indexing does not model; use LoRA-style adapters"
            )
        if args.model_init_kwargs and isinstance(args.model_init_kwargs, Mapping) and \
                args.model_init_kwargs.get("output_router_logits"):
            raise NotImplementedError("model_init_kwargs['output_router_logits']: the Mixture-of-Experts auxiliary "
                                      "loss is not supported by FastDPOTrainer")

    # ------------------------------------------------------------------------------------------------ engine
    def _engine(self) -> DPOEngine:
        """The engine (built on first use: TRL's ``__init__`` may need reference log-probs before it returns)."""
        if self._fast_engine is not None:
            return self._fast_engine
        model = self.model
        if is_peft_model(model) and getattr(model, "active_peft_config", None) is not None and \
                getattr(model.active_peft_config, "is_prompt_learning", False):
            raise NotImplementedError("prompt-learning PEFT models (virtual tokens) are not supported by "
                                      "FastDPOTrainer; use LoRA-style adapters")
        args = self.args
        if self.precompute_ref_logps:
            reference, ref_model = "precomputed", None
        elif self.ref_model is not None:
            reference, ref_model = "model", self.ref_model
        elif is_peft_model(model):
            if "ref" in model.peft_config:
                # TRL copied a pre-trained adapter to "ref": the reference is that adapter, not the bare base model.
                # Its log-probs are computed each step under use_adapter(model, "ref") and handed to the engine.
                self._ref_adapter = "ref"
                reference, ref_model = "precomputed", None
            else:
                reference, ref_model = "adapter", None
        else:  # pragma: no cover - DPOTrainer always builds a reference for full fine-tuning
            raise ValueError("no reference: pass ref_model, a PEFT model, or precompute_ref_log_probs=True")
        opts = self._engine_options
        self._fast_engine = DPOEngine(
            model, ref_model, reference=reference, loss_type=list(args.loss_type), loss_weights=args.loss_weights,
            beta=args.beta, label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
            use_weighting=args.use_weighting, ld_alpha=args.ld_alpha, disable_dropout=args.disable_dropout,
            attn_impl=opts["attn_impl"], grad_in_forward=opts["grad_in_forward"], chunk_size=opts["chunk_size"],
            backend=opts["backend"],
        )
        return self._fast_engine

    @contextlib.contextmanager
    def _no_grad_reference(self, model: torch.nn.Module):
        """No-grad context in which ``model`` computes reference log-probs (adapters swapped for a PEFT policy)."""
        from trl.models.utils import disable_gradient_checkpointing

        adapter_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped) and (self.ref_model is None or model is not self.ref_model):
            adapter_ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter_ctx:
            yield unwrapped

    def compute_ref_log_probs(self, model: torch.nn.Module, inputs: Mapping[str, Any]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32 of one collated batch (TRL's precompute hook)."""
        engine = self._engine()
        with self._no_grad_reference(model) as ref:
            out = engine.compute_logps(ref, inputs, with_grad=False, token_stats=engine.policy_token_stats)
        return out["chosen_logps"], out["rejected_logps"]

    # ------------------------------------------------------------------------------------------------ loss path
    def compute_loss(self, model: torch.nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        """DPO loss of one collated batch through :meth:`DPOEngine.step`; records TRL's metrics."""
        if return_outputs:
            raise NotImplementedError(
                "return_outputs=True: FastDPOTrainer never builds the [batch, seq, vocab] logits (no compute_metrics)"
            )
        mode = "train" if self.model.training else "eval"
        engine = self._engine()
        batch = dict(inputs)
        if self._ref_adapter is not None and not self.precompute_ref_logps:
            with self._no_grad_reference(self.model) as ref:
                out = engine.compute_logps(ref, batch, with_grad=False, token_stats=engine.policy_token_stats)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = out["chosen_logps"], out["rejected_logps"]
        loss, metrics = engine.step(batch)
        self._record_metrics(mode, batch, metrics)
        return loss

    def _record_metrics(self, mode: str, batch: Mapping[str, Any], metrics: Mapping[str, torch.Tensor]) -> None:
        store = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += int(batch.get("num_tokens", int(batch["attention_mask"].sum())))
        for key in _METRIC_ORDER:
            if key == "num_tokens":  # a running total, like TRL
                store[key] = [self._total_train_tokens]
            elif key in metrics:
                store[key].append(float(metrics[key]))
        for key, value in metrics.items():
            if key not in _METRIC_ORDER:
                store[key].append(float(value))

    def prediction_step(self, model: torch.nn.Module, inputs: Mapping[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation step: the DPO loss (metrics recorded under ``eval``); no logits are produced."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
