"""``FastDPOTrainer``'s constructor arguments: what TRL's map to in fastdpo, and the ones it refuses.

* ``args=None``: ``DPOConfig("<model name>-FastDPO")`` (:func:`default_args`, as ``DPOTrainer`` names its run).
* The loss: a :class:`fastdpo.losses.PreferenceLossConfig` from ``DPOConfig``'s loss fields, or the one passed as
  ``loss_config`` (then a field ``args`` sets away from ``DPOConfig``'s default must agree with it), validated either
  way (:func:`loss_config_from_args`).
* The packing: ``packing=``, a :class:`fastdpo.PreferenceCollator`'s, or ``"padding_free"`` / ``"pad"`` from
  ``DPOConfig.padding_free``; TRL's ``DataCollatorForPreference`` hands its settings to the trainer's collator
  (:func:`resolve_packing`).
* Refused with ``NotImplementedError`` naming the option, before any model is loaded (:func:`check_supported`):
  ``use_liger_kernel`` without CUDA, vision-language processors and datasets, collators other than the two above (or
  a ``DataCollatorForPreference`` with its own ``torch_call``), prompt-learning PEFT configs, Mixture-of-Experts
  router logits. The distributed setups are :mod:`fastdpo.integrations.trl_distributed`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fastdpo.collator import PreferenceCollator
from fastdpo.integrations.trl_collate import TrainerCollator
from fastdpo.losses.config import PreferenceLossConfig, resolve_loss_config

__all__ = ["PACKINGS", "check_supported", "default_args", "loss_config_from_args", "resolve_packing"]

PACKINGS = ("pad", "padding_free", "prefix_shared")

# DPOConfig's fields that configure the loss (PreferenceLossConfig's names)
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


def default_args(model: Any) -> DPOConfig:
    """``DPOConfig("<name>-FastDPO")`` for ``args=None``, ``<name>`` the last part of the model's id or path."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
    return DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-FastDPO")


def loss_config_from_args(args: DPOConfig, loss_config: PreferenceLossConfig | None) -> PreferenceLossConfig:
    """The trainer's loss configuration: ``loss_config``, or ``args``' loss fields (``DPOConfig`` defaults: not
    given)."""
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(DPOConfig)
        if f.name in _LOSS_FIELDS
    }
    keywords = {name: getattr(args, name) for name in _LOSS_FIELDS}
    return resolve_loss_config(loss_config, keywords, defaults)


def resolve_packing(
    packing: str | None, data_collator: Any, args: DPOConfig
) -> tuple[str, Any, DataCollatorForPreference | None]:
    """``(packing, data_collator, trl_collator)``: the packing the trainer runs; the collator the trainer passes on
    (``None`` where it builds a :class:`~fastdpo.integrations.trl_collate.TrainerCollator`); TRL's
    ``DataCollatorForPreference`` whose settings that collator takes, if one was given.

    ``ValueError``: ``packing`` not in :data:`PACKINGS`, or disagreeing with a ``PreferenceCollator``'s packing."""
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
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    return packing, data_collator, trl_collator


def check_supported(
    args: DPOConfig, data_collator: Any, train_dataset: Any, processing_class: Any, peft_config: Any
) -> None:
    """Refuse (``NotImplementedError``, ``TypeError`` for ``args`` not a ``DPOConfig``) the options TRL supports and
    FastDPOTrainer does not, from the constructor's arguments (see the module docstring)."""
    if not isinstance(args, DPOConfig):
        raise TypeError(f"args must be a trl.DPOConfig, got {type(args).__name__}")
    if args.use_liger_kernel and args.device.type != "cuda":
        raise NotImplementedError(
            f"use_liger_kernel=True on {args.device.type}: Liger's layer kernels (which FastDPOTrainer keeps, "
            "as TRL does; fastdpo's fused head replaces the loss) are Triton GPU kernels and need a CUDA device; "
            "train without use_liger_kernel here"
        )
    _check_not_vision(processing_class, train_dataset)
    _check_collator(data_collator)
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


def _check_not_vision(processing_class: Any, train_dataset: Any) -> None:
    """Refuse a vision-language processor and a dataset whose first row has ``image`` / ``images``."""
    from transformers import ProcessorMixin

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


def _check_collator(data_collator: Any) -> None:
    """Accept no collator, a ``PreferenceCollator``, the trainer's own, or TRL's ``DataCollatorForPreference`` (not a
    subclass overriding its ``torch_call``)."""
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
        data_collator, (PreferenceCollator, TrainerCollator, DataCollatorForPreference)
    ):
        raise NotImplementedError(
            f"data_collator: FastDPOTrainer needs batches from fastdpo.PreferenceCollator (got "
            f"{type(data_collator).__name__}); pass none (the trainer builds one from DPOConfig), a "
            "PreferenceCollator or TRL's DataCollatorForPreference"
        )
