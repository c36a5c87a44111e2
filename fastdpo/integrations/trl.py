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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.nn.parallel import DistributedDataParallel
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from fastdpo.collator import PreferenceCollator
from fastdpo.engine import DPOEngine
from fastdpo.head.plan import _legacy_tiles
from fastdpo.losses.config import PreferenceLossConfig, resolve_loss_config
from fastdpo.losses.metrics import TRL_METRIC_ORDER
from fastdpo.models import is_deepspeed_engine, is_peft_model, keep_requires_grad
from fastdpo.ref_cache import RefLogpCache, dataset_fingerprint, pair_keys

logger = logging.getLogger(__name__)

__all__ = ["PREDICTION_COLUMNS", "FastDPOTrainer", "sequence_token_ids"]

#: the columns of ``trainer.predict(...).predictions`` (``[P, 6]`` float32, one row per preference pair)
PREDICTION_COLUMNS: tuple[str, ...] = (
    "chosen_logps",
    "rejected_logps",
    "chosen_rewards",
    "rejected_rewards",
    "ref_chosen_logps",
    "ref_rejected_logps",
)

_PACKINGS = ("pad", "padding_free", "prefix_shared")
# the order TRL 1.16 fills ``self._metrics`` in (log lines read the same)


class _TrainerCollator:
    """Data collator for the trainer: a :class:`PreferenceCollator` built on first use from the trainer's tokenizer
    (TRL resolves the processing class inside ``DPOTrainer.__init__``) and the ``DPOConfig`` truncation options.

    Rows are TRL's tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optionally ``ref_chosen_logps``
    / ``ref_rejected_logps``); the batch is the collator's (see :mod:`fastdpo.collator`) plus ``num_tokens`` (int:
    prompt+completion tokens of both sequences of every pair after truncation, what TRL counts in ``num_tokens``).

    With ``trl_collator`` (TRL's ``DataCollatorForPreference`` passed as ``data_collator``), its ``max_length``,
    ``truncation_mode``, ``pad_to_multiple_of`` and ``pad_token_id`` replace the ``DPOConfig`` ones, so the rows are
    cut and padded as TRL's collator would cut and pad them.
    """

    def __init__(
        self,
        trainer: FastDPOTrainer,
        args: DPOConfig,
        packing: str,
        trl_collator: DataCollatorForPreference | None = None,
    ) -> None:
        self._trainer = trainer
        self._args = args
        self.packing = packing
        self.trl_collator = trl_collator
        self._collator: PreferenceCollator | None = None

    @property
    def collator(self) -> PreferenceCollator:
        if self._collator is None:
            source = self.trl_collator if self.trl_collator is not None else self._args
            pad_to = source.pad_to_multiple_of if isinstance(source.pad_to_multiple_of, int) else None
            self._collator = PreferenceCollator(
                self._trainer._tokenizer,
                max_length=source.max_length,
                truncation_mode=source.truncation_mode,
                packing=self.packing,
                pad_to_multiple_of=pad_to,
            )
            if self.trl_collator is not None:
                self._collator.pad_token_id = int(self.trl_collator.pad_token_id)
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
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-FastDPO")
        self._check_supported(args, data_collator, train_dataset, processing_class, peft_config)
        self._loss_config = _loss_config(args, loss_config)
        check_distributed_config(args)  # before any model is loaded or any row tokenized
        trl_collator = data_collator if isinstance(data_collator, DataCollatorForPreference) else None
        if trl_collator is not None:
            data_collator = None
        if isinstance(data_collator, PreferenceCollator):
            if packing is not None and packing != data_collator.packing:
                raise ValueError(
                    f"packing={packing!r} disagrees with the data_collator's packing {data_collator.packing!r}"
                )
            packing = data_collator.packing
        if packing is None:
            packing = "padding_free" if args.padding_free else "pad"
        if packing not in _PACKINGS:
            raise ValueError(f"packing must be one of {_PACKINGS}, got {packing!r}")
        self._fast_engine: DPOEngine | None = None
        if (
            isinstance(sequence_parallel_size, bool)
            or not isinstance(sequence_parallel_size, int)
            or sequence_parallel_size < 1
        ):
            raise ValueError(f"sequence_parallel_size must be a positive int, got {sequence_parallel_size!r}")
        if sequence_parallel_size > 1 and args.precompute_ref_log_probs:
            raise NotImplementedError(
                "precompute_ref_log_probs with sequence_parallel_size > 1: TRL precomputes over a loader sharded over "
                "every rank, but the ranks of a sequence-parallel group must see the same batches; precompute with "
                "sequence_parallel_size=1 (or DPOEngine.precompute_reference) and train on the stored columns"
            )
        if sequence_parallel_size > 1 and (
            getattr(args, "deepspeed_plugin", None) is not None or _requested_fsdp_version(args) is not None
        ):
            raise NotImplementedError(
                f"sequence_parallel_size={sequence_parallel_size} with DeepSpeed or FSDP: fastdpo's sequence "
                "parallelism is validated on DDP (MULTI_CPU/MULTI_GPU) only; launch it without a DeepSpeed/FSDP config"
            )
        self._engine_options = {
            "grad_in_forward": bool(grad_in_forward),
            "attn_impl": attn_impl,
            "token_tile": token_tile,
            "vocab_tile": vocab_tile,
            "backend": backend,
            "sequence_parallel_size": sequence_parallel_size,
        }
        self._ref_adapter: str | None = None  # a PEFT "ref" adapter (re-training an existing adapter), see below
        if data_collator is None:
            data_collator = _TrainerCollator(self, args, packing, trl_collator)
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

    # ------------------------------------------------------------------------------------------------ validation
    @staticmethod
    def _check_supported(
        args: DPOConfig, data_collator: Any, train_dataset: Any, processing_class: Any, peft_config: Any
    ) -> None:
        from transformers import ProcessorMixin

        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a trl.DPOConfig, got {type(args).__name__}")
        if args.use_liger_kernel and args.device.type != "cuda":
            raise NotImplementedError(
                f"use_liger_kernel=True on {args.device.type}: Liger's layer kernels (which FastDPOTrainer keeps, "
                "as TRL does; fastdpo's fused head replaces the loss) are Triton GPU kernels and need a CUDA device; "
                "train without use_liger_kernel here"
            )
        if isinstance(processing_class, ProcessorMixin):
            raise NotImplementedError(
                "vision-language models (a ProcessorMixin processing_class) are not supported by FastDPOTrainer"
            )
        if train_dataset is not None:
            with contextlib.suppress(StopIteration, TypeError):
                sample = next(iter(train_dataset))
                if isinstance(sample, Mapping) and ("image" in sample or "images" in sample):
                    raise NotImplementedError(
                        "vision datasets ('image'/'images' columns) are not supported by FastDPOTrainer"
                    )
        if (
            isinstance(data_collator, DataCollatorForPreference)
            and type(data_collator).torch_call is not DataCollatorForPreference.torch_call
        ):
            raise NotImplementedError(
                f"data_collator: {type(data_collator).__name__} overrides DataCollatorForPreference.torch_call; "
                "FastDPOTrainer collates TRL's rows itself with DataCollatorForPreference's settings and cannot "
                "reproduce a custom batch layout"
            )
        if data_collator is not None and not isinstance(
            data_collator, (PreferenceCollator, _TrainerCollator, DataCollatorForPreference)
        ):
            raise NotImplementedError(
                f"data_collator: FastDPOTrainer needs batches from fastdpo.PreferenceCollator (got "
                f"{type(data_collator).__name__}); pass none (the trainer builds one from DPOConfig), a "
                "PreferenceCollator or TRL's DataCollatorForPreference"
            )
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise NotImplementedError(
                f"peft_config: prompt-learning PEFT methods ({type(peft_config).__name__}) prepend virtual tokens, "
                "which FastDPOTrainer's token indexing does not model; use LoRA-style adapters"
            )
        if (
            args.model_init_kwargs
            and isinstance(args.model_init_kwargs, Mapping)
            and args.model_init_kwargs.get("output_router_logits")
        ):
            raise NotImplementedError(
                "model_init_kwargs['output_router_logits']: the Mixture-of-Experts auxiliary "
                "loss is not supported by FastDPOTrainer"
            )

    def _check_parallelism(self) -> None:
        """Refuse the multi-process setups that are not supported, from the accelerator's state (the same checks as
        :func:`check_distributed_config`, which runs on the arguments before anything is loaded): DDP
        (``MULTI_CPU``/``MULTI_GPU``), DeepSpeed ZeRO stages 0-3 and FSDP2 run multi-process."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if self.is_deepspeed_enabled:
            _check_deepspeed_config(getattr(getattr(acc.state, "deepspeed_plugin", None), "deepspeed_config", {}))
        if self.is_fsdp_enabled:
            _check_fsdp_version(getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", 1))
        config = acc.parallelism_config
        if config is not None:
            _check_parallelism_sizes(config, fsdp2=self.is_fsdp_enabled)
        if acc.num_processes > 1:
            if acc.distributed_type not in (
                DistributedType.MULTI_CPU,
                DistributedType.MULTI_GPU,
                DistributedType.DEEPSPEED,
                DistributedType.FSDP,
            ):
                raise NotImplementedError(
                    f"distributed type {acc.distributed_type} ({acc.num_processes} processes): FastDPOTrainer runs "
                    "DDP (MULTI_CPU, MULTI_GPU), DeepSpeed ZeRO and FSDP2 only"
                )
            if self.args.torch_compile:
                raise NotImplementedError(
                    "torch_compile with several processes: the compiled wrapper around DDP is not validated with "
                    "FastDPOTrainer; train multi-process without torch_compile"
                )
        sp = self._engine_options["sequence_parallel_size"]
        if sp > 1 and (
            acc.num_processes % sp or acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        ):
            raise ValueError(
                f"sequence_parallel_size={sp} needs a multi-process DDP launch (MULTI_CPU/MULTI_GPU) whose process "
                f"count is a multiple of it; got {acc.num_processes} process(es), {acc.distributed_type}"
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

    # ------------------------------------------------------------------------------------------------ engine
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
            model,
            ref_model,
            reference=reference,
            loss_config=self._loss_config,
            disable_dropout=args.disable_dropout,
            attn_impl=opts["attn_impl"],
            grad_in_forward=opts["grad_in_forward"],
            token_tile=opts["token_tile"],
            vocab_tile=opts["vocab_tile"],
            backend=opts["backend"],
            sequence_parallel_size=opts["sequence_parallel_size"],
        )
        return self._fast_engine

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer``'s loader; with sequence parallelism re-sharded over the data-parallel ranks only (the prepared
        sampler shard serves ``num_processes / k`` shards, shard ``process_index // k``), so the ``k`` ranks of a
        sequence-parallel group iterate the same batches -- as ``Trainer`` itself re-shards its rank-aware samplers."""
        loader = super()._get_dataloader(*args, **kwargs)
        sp = self._engine_options["sequence_parallel_size"]
        if sp > 1:
            _shard_over_data_parallel(
                loader, self.accelerator.num_processes // sp, self.accelerator.process_index // sp
            )
        return loader

    @contextlib.contextmanager
    def _no_grad_reference(self, model: torch.nn.Module):
        """No-grad context in which ``model`` computes reference log-probs (adapters swapped for a PEFT policy)."""
        from trl.models.utils import disable_gradient_checkpointing

        adapter_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped) and (self.ref_model is None or model is not self.ref_model):
            adapter_ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            keep_requires_grad(unwrapped),
            adapter_ctx,
        ):  # see fastdpo.models.keep_requires_grad (FSDP2 + PEFT)
            yield unwrapped

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """TRL's ``precompute_ref_log_probs`` pass, sharded and cached by fastdpo (called by ``DPOTrainer.__init__``
        for the train/eval datasets and by ``evaluate``).

        The dataset is ``dataset`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, as TRL returns it. The
        values come from a :class:`~fastdpo.ref_cache.RefLogpCache` at ``<output_dir>/fastdpo_ref_logps/<name>-<id>
        .pt``, whose id hashes the reference's fingerprint (TRL's ``hash_module`` of the reference, rank 0's value),
        the dataset's pairs (content keys of the collated tokens) and the settings that change reference log-probs.
        When that file exists (a resumed run, a second ``evaluate``) it is read and verified (checksum, stamps) and
        no reference forward runs. Otherwise every rank computes the log-probs of its own shard of the dataset (the
        dataloader ``accelerate`` prepares; under ZeRO-3 the reference is TRL's DeepSpeed inference engine of the
        policy, ``prepare_deepspeed``, or the prepared ``ref_model``), the rows are all-gathered and rank 0 writes the
        file once, atomically and checksummed (:meth:`RefLogpCache.build_distributed`); every rank then reads the
        same verified file. ``output_dir`` must be shared by the ranks (as for checkpoints).
        """
        from accelerate.utils import broadcast_object_list
        from datasets import IterableDataset
        from torch.utils.data import DataLoader

        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        settings = self._engine().ref_settings
        keys = [
            key
            for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
            for key in pair_keys(batch)
        ]
        model_hash = [self._precompute_model_hash]
        broadcast_object_list(model_hash, from_process=0)  # ZeRO-3 may have partitioned the model at load
        stamp = json.dumps(
            {"model": model_hash[0], "data": dataset_fingerprint(keys), "settings": settings}, sort_keys=True
        )
        path = os.path.join(
            self.args.output_dir, "fastdpo_ref_logps", f"{name}-{hashlib.sha256(stamp.encode()).hexdigest()[:20]}.pt"
        )
        found = [os.path.exists(path)]
        broadcast_object_list(found, from_process=0)  # one decision for all ranks (they run collectives below)
        if found[0]:
            cache = RefLogpCache.load(path, model_hash=model_hash[0], settings=settings)
        else:
            loader = self.accelerator.prepare(
                DataLoader(
                    dataset,
                    batch_size=batch_size,
                    collate_fn=self.data_collator,
                    shuffle=False,
                    num_workers=self.args.dataloader_num_workers,
                    pin_memory=self.args.dataloader_pin_memory,
                )
            )
            model = self._precompute_reference_model()
            cache = RefLogpCache.build_distributed(
                lambda batch: self.compute_ref_log_probs(model, batch),
                loader,
                path,
                model_hash=model_hash[0],
                settings=settings,
            )
        chosen, rejected = cache.values_for(keys)
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
            "ref_rejected_logps", rejected.tolist()
        )

    def _precompute_reference_model(self) -> torch.nn.Module:
        """The model the precompute pass runs, as TRL picks it: the reference model when there is one, else (full
        fine-tuning under DeepSpeed, PEFT) the policy -- under DeepSpeed wrapped once in TRL's inference engine
        (``prepare_deepspeed``: before ``train`` prepares it, the policy is not yet placed, and under ZeRO-3 it is
        partitioned)."""
        from trl.models import prepare_deepspeed

        if self.ref_model is None and self.is_deepspeed_enabled:
            if getattr(self, "_precompute_engine", None) is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model if self.ref_model is not None else self.model

    def compute_ref_log_probs(
        self, model: torch.nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32 of one collated batch (TRL's precompute hook)."""
        engine = self._engine()
        with self._no_grad_reference(model) as ref, self.accelerator.autocast():
            out = engine.compute_logps(ref, inputs, with_grad=False, token_stats=engine.policy_token_stats)
        return out["chosen_logps"], out["rejected_logps"]

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
        policy = self._policy_wrapper(model)
        if policy is None and mode == "train" and self.accelerator.num_processes > 1 and torch.is_grad_enabled():
            raise RuntimeError(
                f"FastDPOTrainer.compute_loss got a {type(model).__name__} in a {self.accelerator.num_processes}-"
                "process training step; expected the DistributedDataParallel / DeepSpeedEngine wrapper or the FSDP2 "
                "model accelerate prepared (running the unwrapped policy would leave the gradients unreduced)"
            )
        gathers: dict[str, Any] = {}
        if self.accelerator.num_processes > 1:  # metrics over all ranks, gathered like TRL's
            gathers = {"gather": self.accelerator.gather, "gather_totals": self.accelerator.gather_for_metrics}
        pairs: list[torch.Tensor] = []
        if return_outputs:
            # the engine hands ``gather`` this rank's per-pair [P, 4] (policy c, policy r, reference c, reference r)
            # log-probs; record them on the way (identity in one process)
            gather = gathers.get("gather", lambda t: t)
            gathers = {
                "gather_totals": gathers.get("gather_totals", lambda t: t),
                "gather": lambda t: (pairs.append(t), gather(t))[1],
            }
        with autocast():
            loss, metrics = engine.step(batch, policy, **gathers)
        self._record_metrics(mode, batch, metrics)
        if not return_outputs:
            return loss
        if len(pairs) != 1 or pairs[0].shape != (int(batch["num_pairs"]), 4):
            raise RuntimeError(
                f"FastDPOTrainer: expected the engine's [P, 4] per-pair log-probs, got {[list(t.shape) for t in pairs]}"
            )
        pc, pr, rc, rr = pairs[0].unbind(1)
        beta = engine.beta
        predictions = torch.stack([pc, pr, beta * (pc - rc), beta * (pr - rr), rc, rr], dim=1)
        return loss, {"predictions": predictions}

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
        pad_id = self._fast_collator_pad_id()
        return loss.detach(), outputs["predictions"], sequence_token_ids(inputs, pad_id)

    def _fast_collator_pad_id(self) -> int:
        collator = self.data_collator
        if isinstance(collator, _TrainerCollator):
            return collator.collator.pad_token_id
        return int(getattr(collator, "pad_token_id", 0))

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
        ``fastdpo-grad-in-forward`` tags, a "fastdpo settings" section and the fastdpo version."""
        import fastdpo
        from fastdpo.atomic import atomic_write

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += ["fastdpo", f"fastdpo-packing-{self.packing}"]
        if self._engine_options["grad_in_forward"]:
            tags.append("fastdpo-grad-in-forward")
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "README.md"
        text = path.read_text(encoding="utf-8")
        trained = "It has been trained using [TRL](https://github.com/huggingface/trl)."
        text = text.replace(
            trained,
            trained[:-1] + " with fastdpo's DPO engine (`fastdpo.integrations.trl."
            "FastDPOTrainer`: fused LM head, no `[tokens, vocabulary]` logits).",
        )
        section = "### fastdpo settings\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in self._fastdpo_settings().items())
        anchor = "### Framework versions\n\n"
        if anchor in text:
            text = text.replace(anchor, section + "\n" + anchor + f"- fastdpo: {fastdpo.__version__}\n", 1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def sequence_token_ids(batch: Mapping[str, Any], pad_token_id: int) -> torch.Tensor:
    """TRL's ``input_ids`` layout of a collated batch of any packing: ``[2P, L]`` int64, row ``s`` the tokens of
    sequence ``s`` (prompt + completion; chosen of pair ``i`` is ``i``, rejected ``P + i``), right-padded with
    ``pad_token_id`` to the longest sequence (what TRL's ``prediction_step`` returns as label ids)."""
    p = int(batch["num_pairs"])
    ids, seq, role, pair = (batch[k].reshape(-1) for k in ("input_ids", "token_seq", "token_role", "token_pair"))
    shared_prompt = batch.get("packing") == "prefix_shared"  # prompt tokens carry the chosen id in that layout
    rows = []
    for s in range(2 * p):
        i, k = s % p, s // p
        prompt = (role == 0) & (pair == i) & ((seq == i) if shared_prompt else (seq == s))
        rows.append(ids[prompt | ((role == 1 + k) & (seq == s))])
    width = max(1, max(r.numel() for r in rows))
    out = torch.full((2 * p, width), pad_token_id, dtype=torch.long, device=ids.device)
    for s, r in enumerate(rows):
        out[s, : r.numel()] = r
    return out


def _shard_over_data_parallel(loader: Any, num_shards: int, shard: int) -> None:
    """Make an accelerate-prepared loader serve shard ``shard`` of ``num_shards`` (instead of one per process).

    Raises ``NotImplementedError`` for loaders whose split cannot be changed after preparation (batch dispatching
    from rank 0, ``datasets`` iterable datasets pre-sharded per process)."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise NotImplementedError(
            "sequence_parallel_size > 1 with accelerate's batch dispatching "
            "(dispatch_batches / iterable datasets): use a map-style dataset"
        )
    for candidate in (
        getattr(loader, "batch_sampler", None),
        getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
    ):
        if isinstance(candidate, (BatchSamplerShard, IterableDatasetShard)):
            candidate.num_processes, candidate.process_index = num_shards, shard
            return
    raise NotImplementedError(
        f"sequence_parallel_size > 1: cannot re-shard a {type(loader).__name__} over the "
        "data-parallel ranks; use a map-style dataset"
    )


# ---------------------------------------------------------------------------------------------------- parallelism
_LOSS_FIELDS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
    "use_weighting",
    "ld_alpha",
)


def _loss_config(args: DPOConfig, loss_config: PreferenceLossConfig | None) -> PreferenceLossConfig:
    """The trainer's loss configuration: ``loss_config``, or ``args``' loss fields (``DPOConfig`` defaults: not
    given)."""
    import dataclasses

    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(DPOConfig)
        if f.name in _LOSS_FIELDS
    }
    keywords = {name: getattr(args, name) for name in _LOSS_FIELDS}
    return resolve_loss_config(loss_config, keywords, defaults)


def check_distributed_config(args: DPOConfig) -> None:
    """Refuse, from ``args`` and the launcher's environment alone, a distributed setup FastDPOTrainer does not support.

    ``FastDPOTrainer.__init__`` calls it first, before any model is loaded or any row tokenized (``DPOConfig``
    already holds what ``accelerate launch`` configured: the DeepSpeed plugin and its config, the FSDP arguments,
    the parallelism config). Supported: one process; DDP (``MULTI_CPU``/``MULTI_GPU``); DeepSpeed ZeRO stages 0-3
    (``DPOConfig(deepspeed=...)`` or an accelerate DeepSpeed config); FSDP2 (``fsdp_version: 2``). Refused with a
    ``NotImplementedError`` naming the setting: FSDP1; tensor parallelism (``parallelism_config`` ``tp_size``,
    DeepSpeed AutoTP ``tensor_parallel``, a ``tp_plan`` in ``model_init_kwargs``); context and sequence parallelism
    (``cp_size``/``sp_size``, DeepSpeed's ``sequence_parallel_size``); HSDP (``dp_replicate_size`` with sharding).
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        _check_deepspeed_config(plugin.deepspeed_config)
    version = _requested_fsdp_version(args)
    if version is not None:
        _check_fsdp_version(version)
    config = getattr(args, "parallelism_config", None)
    if config is None and os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig()  # what accelerate builds from the launcher's PARALLELISM_CONFIG_* variables
    if config is not None:
        _check_parallelism_sizes(config, fsdp2=version == 2)
    init_kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, Mapping) else {}
    if init_kwargs.get("tp_plan") is not None or int(init_kwargs.get("tp_size") or 1) > 1:
        raise NotImplementedError(
            "model_init_kwargs['tp_plan'/'tp_size']: tensor parallelism is not supported by FastDPOTrainer (the fused "
            "LM head needs the whole output embedding on each rank); use DeepSpeed ZeRO-3 or FSDP2 to shard the model"
        )


def _requested_fsdp_version(args: DPOConfig) -> int | None:
    """The FSDP version ``args`` / the accelerate launcher ask for (``None``: no FSDP). Accelerate's own default is
    version 1 when its config does not say (``FSDP_VERSION``); transformers' ``fsdp_config`` defaults to 2."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:
        return int(plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def _check_fsdp_version(version: int) -> None:
    if version != 2:
        raise NotImplementedError(
            f"FSDP version {version} (FSDP1, FlatParameter sharding) is not supported by FastDPOTrainer: use FSDP2 "
            "(fsdp_version: 2 in the accelerate config, or DPOConfig(fsdp=..., fsdp_config={'version': 2}))"
        )


def _check_parallelism_sizes(config: Any, *, fsdp2: bool) -> None:
    """Refuse tensor/context/sequence parallelism and HSDP in an accelerate ``ParallelismConfig``."""
    sizes = {name: getattr(config, f"{name}_size", 1) or 1 for name in ("tp", "cp", "sp", "dp_shard", "dp_replicate")}
    active = {name: size for name, size in sizes.items() if size > 1 and name in ("tp", "cp", "sp")}
    if active:
        raise NotImplementedError(
            f"parallelism_config {active}: FastDPOTrainer supports data parallelism (DDP), DeepSpeed ZeRO and FSDP2 "
            "sharding only; tensor/context/sequence parallelism are not supported (fastdpo's own sequence "
            "parallelism: FastDPOTrainer(sequence_parallel_size=k))"
        )
    if sizes["dp_shard"] > 1 and not fsdp2:
        raise NotImplementedError(
            f"parallelism_config dp_shard_size={sizes['dp_shard']} without FSDP2: sharding through the parallelism "
            "config needs fsdp_version: 2"
        )
    if sizes["dp_replicate"] > 1 and sizes["dp_shard"] > 1:
        raise NotImplementedError(
            f"parallelism_config dp_replicate_size={sizes['dp_replicate']} with dp_shard_size={sizes['dp_shard']} "
            "(HSDP) is not validated with FastDPOTrainer; use FSDP2 over one data-parallel dimension or DeepSpeed"
        )


def _check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Refuse the DeepSpeed features FastDPOTrainer does not support (ZeRO stages 0-3 are supported)."""
    tp = config.get("tensor_parallel") or {}
    autotp = tp.get("autotp_size", tp.get("tp_size", 1)) if isinstance(tp, Mapping) else 1
    if int(autotp or 1) > 1:
        raise NotImplementedError(
            f"DeepSpeed tensor_parallel (AutoTP, size {autotp}): tensor parallelism is not supported by "
            "FastDPOTrainer (the fused LM head needs the whole output embedding); use ZeRO-3 to shard the model"
        )
    sp = config.get("sequence_parallel_size", 1)
    if int(sp or 1) > 1:
        raise NotImplementedError(
            f"DeepSpeed sequence_parallel_size={sp}: DeepSpeed's sequence parallelism is not supported by "
            "FastDPOTrainer"
        )
