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

Multi-process data parallelism (``accelerate launch`` / ``torchrun``, accelerate's ``DistributedDataParallel``:
``MULTI_CPU`` and ``MULTI_GPU``) is supported: the policy forward runs through the DDP wrapper ``compute_loss``
receives (gradients are averaged over ranks), the reference runs as TRL prepared it (a separate model placed with
``prepare_model(evaluation_mode=True)``, the adapter-disabled PEFT base, or precomputed log-probs gathered over the
ranks), and the metrics are gathered exactly as TRL gathers them (token-weighted sums and counts with
``gather_for_metrics``, per-pair rewards and log-probs with ``gather``, the ``num_tokens`` total), so every rank logs
TRL's numbers (``tests/test_trl_distributed.py``: 2 gloo processes, same loss, grad norm, metrics and parameters as
``DPOTrainer``).

Options TRL has and fastdpo does not support raise ``NotImplementedError`` naming the option (never a silent
fallback): vision-language models/datasets, ``compute_metrics`` (needs logits), Mixture-of-Experts auxiliary loss
(``router_aux_loss_coef``), prompt-learning PEFT methods (virtual tokens), a custom non-fastdpo ``data_collator``, and
the multi-process setups that are not validated: DeepSpeed (any ZeRO stage), FSDP through accelerate (``DPOEngine``
itself trains FSDP2 ``fully_shard`` models in a custom loop), tensor/context/sequence parallelism through accelerate's
``parallelism_config`` (fastdpo's own sequence parallelism is ``sequence_parallel_size=k``, on DDP), other
distributed types (XLA, ...) and ``torch_compile`` with several processes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
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
            ``mean_token_accuracy``) are then not logged.
        attn_impl: attention path for packed batches (:func:`fastdpo.attention.build_attention_kwargs`).
        chunk_size, backend: forwarded to the fused head (``backend="auto"``: Triton on CUDA, PyTorch elsewhere).
        sequence_parallel_size: ``k > 1`` trains sequence-parallel (:class:`~fastdpo.engine.DPOEngine`'s
            ``sequence_parallel_size``): ranks ``[i·k, (i+1)·k)`` form sequence-parallel group ``i`` and receive the
            same batches (the data loaders are sharded over the ``num_processes / k`` data-parallel ranks only),
            accelerate's DDP wrapper over all ranks reduces the gradients. Multi-process DDP only (``MULTI_CPU`` /
            ``MULTI_GPU``); not with ``precompute_ref_log_probs`` or ``grad_in_forward``.

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
        sequence_parallel_size: int = 1,
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
        if isinstance(sequence_parallel_size, bool) or not isinstance(sequence_parallel_size, int) or \
                sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size must be a positive int, got {sequence_parallel_size!r}")
        if sequence_parallel_size > 1 and args.precompute_ref_log_probs:
            raise NotImplementedError(
                "precompute_ref_log_probs with sequence_parallel_size > 1: TRL precomputes over a loader sharded over "
                "every rank, but the ranks of a sequence-parallel group must see the same batches; precompute with "
                "sequence_parallel_size=1 (or DPOEngine.precompute_reference) and train on the stored columns"
            )
        self._engine_options = {"grad_in_forward": bool(grad_in_forward), "attn_impl": attn_impl,
                                "chunk_size": chunk_size, "backend": backend,
                                "sequence_parallel_size": sequence_parallel_size}
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
        self._check_parallelism()
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

    def _check_parallelism(self) -> None:
        """Refuse the multi-process setups that are not validated: only data parallelism through accelerate's
        ``DistributedDataParallel`` (``MULTI_CPU``/``MULTI_GPU``) runs multi-process."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "DeepSpeed: FastDPOTrainer is validated with DDP data parallelism (MULTI_CPU/MULTI_GPU) only; "
                "DeepSpeed (ZeRO stages, parameter gathering around the fused head) is not tested. Launch without a "
                "DeepSpeed config, or use trl.DPOTrainer"
            )
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "FSDP through accelerate: FastDPOTrainer is validated with DDP data parallelism only (the trainer's "
                "FSDP wiring -- prepare_fsdp reference, sharded checkpoints -- is not tested); DPOEngine itself "
                "trains FSDP2 fully_shard models in your own loop (tests/test_distributed.py), or use trl.DPOTrainer"
            )
        config = acc.parallelism_config
        if config is not None:
            sizes = {name: getattr(config, f"{name}_size", 1) or 1 for name in ("tp", "cp", "sp", "dp_shard")}
            active = {name: size for name, size in sizes.items() if size > 1}
            if active:
                raise NotImplementedError(
                    f"parallelism_config {active}: FastDPOTrainer supports data-parallel replication (DDP) only; "
                    "tensor/context/sequence parallelism and sharding are not supported (fastdpo's own sequence "
                    "parallelism: FastDPOTrainer(sequence_parallel_size=k))"
                )
        if acc.num_processes > 1:
            if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
                raise NotImplementedError(
                    f"distributed type {acc.distributed_type} ({acc.num_processes} processes): FastDPOTrainer is "
                    "validated with DDP on MULTI_CPU and MULTI_GPU only"
                )
            if self.args.torch_compile:
                raise NotImplementedError(
                    "torch_compile with several processes: the compiled wrapper around DDP is not validated with "
                    "FastDPOTrainer; train multi-process without torch_compile"
                )
        sp = self._engine_options["sequence_parallel_size"]
        if sp > 1 and (acc.num_processes % sp or acc.distributed_type not in (DistributedType.MULTI_CPU,
                                                                               DistributedType.MULTI_GPU)):
            raise ValueError(
                f"sequence_parallel_size={sp} needs a multi-process DDP launch (MULTI_CPU/MULTI_GPU) whose process "
                f"count is a multiple of it; got {acc.num_processes} process(es), {acc.distributed_type}"
            )

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
            backend=opts["backend"], sequence_parallel_size=opts["sequence_parallel_size"],
        )
        return self._fast_engine

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer``'s loader; with sequence parallelism re-sharded over the data-parallel ranks only (the prepared
        sampler shard serves ``num_processes / k`` shards, shard ``process_index // k``), so the ``k`` ranks of a
        sequence-parallel group iterate the same batches -- as ``Trainer`` itself re-shards its rank-aware samplers."""
        loader = super()._get_dataloader(*args, **kwargs)
        sp = self._engine_options["sequence_parallel_size"]
        if sp > 1:
            _shard_over_data_parallel(loader, self.accelerator.num_processes // sp,
                                      self.accelerator.process_index // sp)
        return loader

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
        with self._no_grad_reference(model) as ref, self.accelerator.autocast():
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
        # Mixed precision (bf16=True / fp16=True): accelerate autocasts only the model's forward, where TRL's lm_head
        # runs; the fused head runs after it, so the step runs under the accelerator's autocast, in which the engine
        # gives the head the autocast dtype (see fastdpo.engine._head_operands). A no-op without mixed precision.
        autocast = self.accelerator.autocast
        if self._ref_adapter is not None and not self.precompute_ref_logps:
            with self._no_grad_reference(self.model) as ref, autocast():
                out = engine.compute_logps(ref, batch, with_grad=False, token_stats=engine.policy_token_stats)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = out["chosen_logps"], out["rejected_logps"]
        # Under DDP the Trainer hands the accelerate-prepared wrapper: the policy forward must run through it so that
        # DDP's reducer averages the gradients. Any other module (self.model; a torch.compile wrapper in a single
        # process) leaves the engine running its own, unwrapped policy.
        policy = model if isinstance(model, DistributedDataParallel) else None
        if policy is None and mode == "train" and self.accelerator.num_processes > 1 and torch.is_grad_enabled():
            raise RuntimeError(
                f"FastDPOTrainer.compute_loss got a {type(model).__name__} in a {self.accelerator.num_processes}-"
                "process training step; expected the DistributedDataParallel wrapper accelerate prepared (running the "
                "unwrapped policy would leave the gradients unreduced)"
            )
        gathers: dict[str, Any] = {}
        if self.accelerator.num_processes > 1:  # metrics over all ranks, gathered like TRL's
            gathers = {"gather": self.accelerator.gather, "gather_totals": self.accelerator.gather_for_metrics}
        with autocast():
            loss, metrics = engine.step(batch, policy, **gathers)
        self._record_metrics(mode, batch, metrics)
        return loss

    def _record_metrics(self, mode: str, batch: Mapping[str, Any], metrics: Mapping[str, torch.Tensor]) -> None:
        """Append this step's metrics (already global over ranks, see :meth:`compute_loss`) to ``self._metrics``;
        ``num_tokens`` is the running total of training tokens over all ranks (TRL gathers it the same way)."""
        store = self._metrics[mode]
        if mode == "train":
            tokens = int(batch.get("num_tokens", int(batch["attention_mask"].sum())))
            if self.accelerator.num_processes > 1:
                local = torch.tensor(tokens, dtype=torch.long, device=self.accelerator.device)
                # the k ranks of a sequence-parallel group hold the same batch: count it once
                tokens = int(self.accelerator.gather_for_metrics(local).sum().item()) // \
                    self._engine_options["sequence_parallel_size"]
            self._total_train_tokens += tokens
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


def _shard_over_data_parallel(loader: Any, num_shards: int, shard: int) -> None:
    """Make an accelerate-prepared loader serve shard ``shard`` of ``num_shards`` (instead of one per process).

    Raises ``NotImplementedError`` for loaders whose split cannot be changed after preparation (batch dispatching
    from rank 0, ``datasets`` iterable datasets pre-sharded per process)."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise NotImplementedError("sequence_parallel_size > 1 with accelerate's batch dispatching "
                                  "(dispatch_batches / iterable datasets): use a map-style dataset")
    for candidate in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None),
                      getattr(loader, "dataset", None)):
        if isinstance(candidate, (BatchSamplerShard, IterableDatasetShard)):
            candidate.num_processes, candidate.process_index = num_shards, shard
            return
    raise NotImplementedError(f"sequence_parallel_size > 1: cannot re-shard a {type(loader).__name__} over the "
                              "data-parallel ranks; use a map-style dataset")
