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
TRL's numbers (``tests/test_trl_multiprocess.py``: 2 gloo processes, same loss, grad norm, metrics and parameters as
``DPOTrainer``).

Where fastdpo differs from TRL by design (documented, never silent):

* ``trainer.predict(...)`` / ``evaluate()`` with ``compute_metrics``: fastdpo never builds the ``[2P, L, V]`` logits
  TRL returns as predictions. The predictions are what it has, per preference pair: a float32 ``[P, 6]`` array with
  the columns :data:`PREDICTION_COLUMNS` (policy chosen / rejected summed completion log-probs, chosen / rejected
  rewards ``beta * (policy - reference)``, reference chosen / rejected log-probs), pairs in dataset order. The label
  ids are TRL's: the ``[2P, L]`` token ids of every sequence (prompt + completion after truncation; the P chosen rows,
  then the P rejected rows; right-padded with the pad token id, across batches with -100), whatever the packing --
  including what accelerate's ``gather_for_metrics`` does to them on the last batch (it keeps as many rows as
  samples remain, as for TRL's). ``compute_metrics`` receives both in an ``EvalPrediction``.
* ``torch_compile=True`` compiles each decoder layer of the backbone (``torch.compile`` with the configured backend
  and mode, in place: the engine runs the model's own forward, the LM head is the fused one and is not compiled), for
  the policy and a separate reference model; a model without recognizable decoder layers is refused. Multi-process
  compilation is refused (not validated).
* ``data_collator``: a :class:`fastdpo.PreferenceCollator`, or TRL's own ``DataCollatorForPreference``, whose
  settings (``pad_token_id``, ``max_length``, ``truncation_mode``, ``pad_to_multiple_of``) configure the
  ``PreferenceCollator`` that collates the same tokenized rows (``"pad"`` packing is then TRL's batch token for token).
* ``use_liger_kernel=True``: honoured as TRL 1.16 honours it -- Liger's layer kernels (RMSNorm, RoPE, SwiGLU, ...)
  patched into the backbone by ``transformers.Trainer``, Liger's fused linear cross-entropy left off -- with
  fastdpo's fused head in place of TRL's. Liger's kernels are Triton GPU kernels: on a machine without CUDA the
  option is refused at construction (TRL fails in its first forward there).
* The model card (``README.md`` of ``output_dir``, written with checkpoints and by ``create_model_card``) carries
  the ``fastdpo`` tag, a tag per non-default setting and a "fastdpo settings" section (packing, grad_in_forward,
  reference mode, loss, torch_compile).

Sharded training (``accelerate launch`` with a DeepSpeed or FSDP2 config, ``DPOConfig(deepspeed=...)``,
``DPOConfig(fsdp=True, fsdp_config={"version": 2})``): DeepSpeed ZeRO stages 0-3 (parameter / optimizer offload and
ZeRO++ hpZ included) and FSDP2 train as with ``DPOTrainer``. The policy forward runs through the ``DeepSpeedEngine``
``compute_loss`` receives (or the model FSDP2 sharded in place); under ZeRO-3 the fused head runs as a call of the
head module, so ZeRO's hooks gather the partitioned ``lm_head`` for it and reduce-scatter its gradient
(:meth:`fastdpo.models.LMParts.call_head`); under FSDP2 the head weight is gathered once per pass, never per tile.
The reference is what TRL prepares: a ZeRO-3 inference engine / ``fully_shard``-ed copy of ``ref_model``, or the
adapter-disabled PEFT policy; with ``precompute_ref_log_probs=True`` each rank computes the reference log-probs of its
own shard of the dataset and rank 0 writes them once, atomically and checksummed, to
``<output_dir>/fastdpo_ref_logps/`` (:meth:`FastDPOTrainer._precompute_ref_logps`), where a resumed run finds them.
(``tests/test_trl_multiprocess.py``: ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU processes against ``DPOTrainer``.)

Options TRL has and fastdpo does not support raise ``NotImplementedError`` naming the option (never a silent
fallback): vision-language models/datasets, Mixture-of-Experts auxiliary loss (``router_aux_loss_coef``),
prompt-learning PEFT methods (virtual tokens), a ``data_collator`` other than the two above, and the distributed
setups :func:`check_distributed_config` refuses -- before any model is loaded or any row tokenized -- FSDP1, tensor
parallelism (``parallelism_config`` ``tp_size``, DeepSpeed AutoTP, ``tp_plan``), context / sequence parallelism
through accelerate's ``parallelism_config`` or DeepSpeed (fastdpo's own sequence parallelism is
``sequence_parallel_size=k``, on DDP), HSDP; and, after construction, other distributed types (XLA, ...) and
``torch_compile`` with several processes.

The trainer is cut along its seams: the constructor's arguments and what they map to (:mod:`.trl_args`), the
distributed setups and the data-parallel sharding of sequence parallelism (:mod:`.trl_distributed`), collation and
the predictions (:mod:`.trl_collate`), the reference and its precomputed log-probs (:mod:`.trl_reference`), the model
card (:func:`fastdpo.model_card.add_fastdpo_settings`); this module holds the trainer and its loss step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.nn.parallel import DistributedDataParallel
from trl import DPOConfig, DPOTrainer

from fastdpo.engine import DPOEngine
from fastdpo.head.plan import _legacy_tiles
from fastdpo.integrations.trl_args import check_supported, default_args, loss_config_from_args, resolve_packing
from fastdpo.integrations.trl_collate import (
    PREDICTION_COLUMNS,
    TrainerCollator,
    collator_pad_id,
    pair_predictions,
    sequence_token_ids,
)
from fastdpo.integrations.trl_distributed import (
    check_accelerator,
    check_distributed_config,
    check_sequence_parallel_args,
    shard_over_data_parallel,
)
from fastdpo.integrations.trl_reference import ReferenceMixin
from fastdpo.losses.config import PreferenceLossConfig
from fastdpo.losses.metrics import TRL_METRIC_ORDER
from fastdpo.model_card import add_fastdpo_settings
from fastdpo.models import is_deepspeed_engine, is_peft_model

__all__ = ["PREDICTION_COLUMNS", "FastDPOTrainer", "check_distributed_config", "sequence_token_ids"]


class FastDPOTrainer(ReferenceMixin, DPOTrainer):
    """``trl.DPOTrainer`` (TRL 1.16) whose loss path is :class:`fastdpo.engine.DPOEngine`.

    See the module docstring for what differs from ``DPOTrainer`` by design (predictions, ``torch_compile``,
    collators, ``use_liger_kernel``, the model card).

    Takes every argument of ``DPOTrainer`` plus, keyword-only:

    Args:
        packing: ``"pad"`` (TRL's layout), ``"padding_free"`` or ``"prefix_shared"``. Default: ``"padding_free"``
            when ``args.padding_free`` else ``"pad"``.
        grad_in_forward: form the LM-head gradients during the forward (3 GEMMs instead of 4; see
            :class:`~fastdpo.engine.DPOEngine`). The token metrics (``logits/*``, ``entropy``,
            ``mean_token_accuracy``) are then not logged.
        attn_impl: attention path for packed batches (:func:`fastdpo.attention.build_attention_kwargs`).
        token_tile, vocab_tile, backend: forwarded to the fused head (``backend="auto"``: Triton on CUDA, PyTorch
            elsewhere); ``chunk_size`` is the tiles' deprecated spelling (``DeprecationWarning``).
        loss_config: a :class:`fastdpo.losses.PreferenceLossConfig` for the loss instead of ``args``' loss fields
            (``loss_type``, ``loss_weights``, ``beta``, ``label_smoothing``, ``f_divergence_type``,
            ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting``, ``ld_alpha``); a field ``args`` sets
            away from ``DPOConfig``'s default must agree with it. Built from ``args`` otherwise; either way validated
            here, so an option the selected loss would ignore raises (TRL ignores it silently).
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

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "fastdpo"]

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
        token_tile: int | None = None,
        vocab_tile: int | None = None,
        backend: str = "auto",
        sequence_parallel_size: int = 1,
        chunk_size: int | tuple[int, int] | None = None,
        loss_config: PreferenceLossConfig | None = None,
    ) -> None:
        token_tile, vocab_tile = _legacy_tiles(type(self).__name__, chunk_size, token_tile, vocab_tile)
        if args is None:
            args = default_args(model)
        check_supported(args, data_collator, train_dataset, processing_class, peft_config)
        self._loss_config = loss_config_from_args(args, loss_config)
        check_distributed_config(args)  # before any model is loaded or any row tokenized
        packing, data_collator, trl_collator = resolve_packing(packing, data_collator, args)
        self._fast_engine: DPOEngine | None = None
        check_sequence_parallel_args(sequence_parallel_size, args)
        # DPOEngine's keywords, as given here (the engine is built on first use, see _engine)
        self._engine_options = {
            "grad_in_forward": bool(grad_in_forward),
            "attn_impl": attn_impl,
            "token_tile": token_tile,
            "vocab_tile": vocab_tile,
            "backend": backend,
            "sequence_parallel_size": sequence_parallel_size,
        }
        self._ref_adapter: str | None = None  # a PEFT "ref" adapter (re-training an existing adapter), see _engine
        if data_collator is None:
            data_collator = TrainerCollator(self, args, packing, trl_collator)
        # TRL 1.16 warns that padding_free is unavailable and falls back to padding; here it selects our packing, so
        # keep TRL from warning (and restore the user's flag afterwards).
        padding_free = args.padding_free
        args.padding_free = False
        try:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
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
        self.compiled_layers = self._compile_backbone() if args.torch_compile else 0

    # ------------------------------------------------------------------------------------------------ setup
    def _check_parallelism(self) -> None:
        """Refuse the multi-process setups that are not supported, from the accelerator's state
        (:func:`~fastdpo.integrations.trl_distributed.check_accelerator`)."""
        check_accelerator(
            self.accelerator,
            deepspeed=self.is_deepspeed_enabled,
            fsdp=self.is_fsdp_enabled,
            torch_compile=self.args.torch_compile,
            sequence_parallel_size=self._engine_options["sequence_parallel_size"],
        )

    def _compile_backbone(self) -> int:
        """``torch_compile``: compile every decoder layer of the policy and of a separate reference model in place
        (``nn.Module.compile`` with ``args.torch_compile_backend`` / ``torch_compile_mode``) and return how many.

        The engine never calls the ``torch.compile`` wrapper accelerate puts around the model (it runs the model's
        own forward and the fused head), so compiling the wrapper alone would compile nothing; the decoder layers
        (``_no_split_modules`` of the Hugging Face model) hold nearly all of the backbone's work.
        ``NotImplementedError``
        when a model names no decoder layer class."""
        args = self.args
        count = 0
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        for model in models:
            hf = self.accelerator.unwrap_model(model)
            if is_peft_model(hf):
                hf = hf.get_base_model()
            names = set(getattr(hf, "_no_split_modules", None) or ())
            layers = [m for m in hf.modules() if type(m).__name__ in names]
            if not layers:
                raise NotImplementedError(
                    f"torch_compile: {type(hf).__name__} names no decoder layer class (_no_split_modules), so "
                    "FastDPOTrainer cannot compile its backbone; train without torch_compile"
                )
            for layer in layers:
                layer.compile(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
            count += len(layers)
        return count

    def _engine(self) -> DPOEngine:
        """The engine (built on first use: TRL's ``__init__`` may need reference log-probs before it returns)."""
        if self._fast_engine is not None:
            return self._fast_engine
        model = self.model
        if (
            is_peft_model(model)
            and getattr(model, "active_peft_config", None) is not None
            and getattr(model.active_peft_config, "is_prompt_learning", False)
        ):
            raise NotImplementedError(
                "prompt-learning PEFT models (virtual tokens) are not supported by "
                "FastDPOTrainer; use LoRA-style adapters"
            )
        reference, ref_model = self._reference_mode()
        self._fast_engine = DPOEngine(
            model,
            ref_model,
            reference=reference,
            loss_config=self._loss_config,
            disable_dropout=self.args.disable_dropout,
            **self._engine_options,
        )
        return self._fast_engine

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer``'s loader; with sequence parallelism re-sharded over the data-parallel ranks only (the prepared
        sampler shard serves ``num_processes / k`` shards, shard ``process_index // k``), so the ``k`` ranks of a
        sequence-parallel group iterate the same batches -- as ``Trainer`` itself re-shards its rank-aware samplers."""
        loader = super()._get_dataloader(*args, **kwargs)
        sp = self._engine_options["sequence_parallel_size"]
        if sp > 1:
            shard_over_data_parallel(loader, self.accelerator.num_processes // sp, self.accelerator.process_index // sp)
        return loader

    # ------------------------------------------------------------------------------------------------ loss path
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss of one collated batch through :meth:`DPOEngine.step`; records TRL's metrics.

        ``return_outputs=True`` returns ``(loss, {"predictions": [P, 6] fp32})``, this rank's pairs, columns
        :data:`PREDICTION_COLUMNS` (no logits are ever built)."""
        mode = "train" if self.model.training else "eval"
        engine = self._engine()
        batch = dict(inputs)
        if self._ref_adapter is not None and not self.precompute_ref_logps:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = self.compute_ref_log_probs(self.model, batch)
        # Under DDP the Trainer hands the accelerate-prepared wrapper: the policy forward must run through it so that
        # DDP's reducer averages the gradients. Any other module (self.model; a torch.compile wrapper in a single
        # process) leaves the engine running its own, unwrapped policy.
        policy = self._policy_wrapper(model)
        if policy is None and mode == "train" and self.accelerator.num_processes > 1 and torch.is_grad_enabled():
            raise RuntimeError(
                f"FastDPOTrainer.compute_loss got a {type(model).__name__} in a {self.accelerator.num_processes}-"
                "process training step; expected the DistributedDataParallel / DeepSpeedEngine wrapper or the FSDP2 "
                "model accelerate prepared (running the unwrapped policy would leave the gradients unreduced)"
            )
        pairs: list[torch.Tensor] = []
        # Mixed precision (bf16=True / fp16=True): accelerate autocasts only the model's forward, where TRL's lm_head
        # runs; the fused head runs after it, so the step runs under the accelerator's autocast, in which the engine
        # gives the head the autocast dtype (see fastdpo.engine_inputs.head_operands). A no-op without mixed precision.
        with self.accelerator.autocast():
            loss, metrics = engine.step(batch, policy, **self._metric_gathers(pairs if return_outputs else None))
        self._record_metrics(mode, batch, metrics)
        if not return_outputs:
            return loss
        return loss, {"predictions": pair_predictions(pairs, int(batch["num_pairs"]), engine.beta)}

    def _policy_wrapper(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module the policy forward must run through: the ``DistributedDataParallel`` / ``DeepSpeedEngine``
        wrapper ``compute_loss`` received (DDP's reducer, DeepSpeed's forward prologue and ZeRO hooks), the FSDP2
        model itself (``fully_shard`` shards it in place: its hooks are on the module), or ``None`` (a single process,
        a ``torch.compile`` wrapper: the engine runs its own, unwrapped policy)."""
        if isinstance(model, DistributedDataParallel) or is_deepspeed_engine(model):
            return model
        if self.is_fsdp_enabled and model is self._engine().model:
            return model
        return None

    def _metric_gathers(self, pairs: list[torch.Tensor] | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The ``gather`` / ``gather_totals`` keywords of :meth:`DPOEngine.step`: with several processes the metrics
        are gathered over all ranks as TRL gathers them (none in one process). With ``pairs``, ``gather`` also appends
        to it what the engine hands it: this rank's per-pair ``[P, 4]`` log-probs (policy chosen, policy rejected,
        reference chosen, reference rejected)."""
        gathers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if self.accelerator.num_processes > 1:
            gathers = {"gather": self.accelerator.gather, "gather_totals": self.accelerator.gather_for_metrics}
        if pairs is None:
            return gathers
        gather = gathers.get("gather", lambda t: t)
        return {
            "gather_totals": gathers.get("gather_totals", lambda t: t),
            "gather": lambda t: (pairs.append(t), gather(t))[1],
        }

    def _record_metrics(self, mode: str, batch: Mapping[str, Any], metrics: Mapping[str, torch.Tensor]) -> None:
        """Append this step's metrics (already global over ranks, see :meth:`compute_loss`) to ``self._metrics``;
        ``num_tokens`` is the running total of training tokens over all ranks (TRL gathers it the same way)."""
        store = self._metrics[mode]
        if mode == "train":
            tokens = int(batch.get("num_tokens", int(batch["attention_mask"].sum())))
            if self.accelerator.num_processes > 1:
                local = torch.tensor(tokens, dtype=torch.long, device=self.accelerator.device)
                # the k ranks of a sequence-parallel group hold the same batch: count it once
                tokens = (
                    int(self.accelerator.gather_for_metrics(local).sum().item())
                    // self._engine_options["sequence_parallel_size"]
                )
            self._total_train_tokens += tokens
        for key in TRL_METRIC_ORDER:
            if key == "num_tokens":  # a running total, like TRL
                store[key] = [self._total_train_tokens]
            elif key in metrics:
                store[key].append(float(metrics[key]))
        for key, value in metrics.items():
            if key not in TRL_METRIC_ORDER:
                store[key].append(float(value))

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation step: the DPO loss (metrics recorded under ``eval``); unless ``prediction_loss_only``, also
        the per-pair predictions ``[P, 6]`` (:data:`PREDICTION_COLUMNS`) and TRL's label ids ``[2P, L]`` (see
        :func:`sequence_token_ids`). No logits are produced."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs["predictions"], sequence_token_ids(inputs, collator_pad_id(self.data_collator))

    # ------------------------------------------------------------------------------------------------ model card
    def _fastdpo_settings(self) -> dict[str, Any]:
        engine = self._engine()
        return {
            "packing": self.packing,
            "grad_in_forward": self._engine_options["grad_in_forward"],
            "reference": engine.reference + (" (PEFT 'ref' adapter)" if self._ref_adapter else ""),
            "loss_type": list(engine.loss_config.loss_type),
            "loss_weights": list(engine.loss_config.loss_weights),
            "beta": engine.loss_config.beta,
            "attn_impl": self._engine_options["attn_impl"],
            "torch_compile": f"{self.compiled_layers} decoder layers" if self.compiled_layers else False,
        }

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """TRL's model card plus fastdpo: the ``fastdpo`` tag, ``fastdpo-packing-<packing>`` and
        ``fastdpo-grad-in-forward`` tags, a "fastdpo settings" section and the fastdpo version
        (:func:`fastdpo.model_card.add_fastdpo_settings`)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += ["fastdpo", f"fastdpo-packing-{self.packing}"]
        if self._engine_options["grad_in_forward"]:
            tags.append("fastdpo-grad-in-forward")
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            add_fastdpo_settings(Path(self.args.output_dir) / "README.md", self._fastdpo_settings())
