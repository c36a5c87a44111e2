"""The reference of :class:`~fastdpo.integrations.trl.FastDPOTrainer`: which model it is, and its precomputed log-probs.

The reference is what TRL prepares (:meth:`ReferenceMixin._reference_mode`): a separate ``ref_model``
(``reference="model"``); the PEFT base with the adapters disabled (``"adapter"``); TRL's copy of a pre-trained adapter
named ``"ref"``, whose log-probs are computed each step and handed to the engine (``"precomputed"``, with
``_ref_adapter = "ref"``); or log-probs precomputed into the dataset (``precompute_ref_log_probs=True`` ->
``"precomputed"``). Reference log-probs are ``(chosen [P], rejected [P])`` float32 summed completion log-probs
(:meth:`ReferenceMixin.compute_ref_log_probs`), computed without gradients (:meth:`ReferenceMixin._no_grad_reference`).

Precompute (TRL's ``_precompute_ref_logps`` hook, :meth:`ReferenceMixin._precompute_ref_logps`): sharded over the
ranks and cached by fastdpo in a checksummed :class:`~fastdpo.ref_cache.RefLogpCache` under
``<output_dir>/fastdpo_ref_logps/``, whose name hashes the reference, the dataset's pairs and the settings that change
reference log-probs; a resumed run (or a second ``evaluate``) reads it back instead of running the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from trl.trainer.utils import use_adapter

from fastdpo.models import is_peft_model, keep_requires_grad
from fastdpo.ref_cache import RefLogpCache, dataset_fingerprint, pair_keys

__all__ = ["ReferenceMixin"]


class ReferenceMixin:
    """Reference methods of :class:`~fastdpo.integrations.trl.FastDPOTrainer` (a mixin placed before
    ``DPOTrainer``, whose ``_precompute_ref_logps`` it overrides). The host provides ``DPOTrainer``'s attributes
    (``model``, ``ref_model``, ``args``, ``accelerator``, ``data_collator``, ``precompute_ref_logps``,
    ``_precompute_model_hash``, ``is_deepspeed_enabled``), ``_engine()`` (the :class:`~fastdpo.engine.DPOEngine`) and
    ``_ref_adapter`` (``None`` until :meth:`_reference_mode` finds TRL's ``"ref"`` adapter)."""

    def _reference_mode(self) -> tuple[str, torch.nn.Module | None]:
        """``(reference, ref_model)`` for :class:`~fastdpo.engine.DPOEngine` (see the module docstring); sets
        ``_ref_adapter`` to ``"ref"`` when the reference is TRL's copy of a pre-trained adapter."""
        model = self.model
        if self.precompute_ref_logps:
            return "precomputed", None
        if self.ref_model is not None:
            return "model", self.ref_model
        if not is_peft_model(model):  # pragma: no cover - DPOTrainer always builds a reference for full fine-tuning
            raise ValueError("no reference: pass ref_model, a PEFT model, or precompute_ref_log_probs=True")
        if "ref" in model.peft_config:
            # TRL copied a pre-trained adapter to "ref": the reference is that adapter, not the bare base model.
            # Its log-probs are computed each step under use_adapter(model, "ref") and handed to the engine.
            self._ref_adapter = "ref"
            return "precomputed", None
        return "adapter", None

    @contextlib.contextmanager
    def _no_grad_reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
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

    def compute_ref_log_probs(
        self, model: torch.nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32 of one collated batch (TRL's precompute hook;
        also the per-step log-probs of TRL's ``"ref"`` adapter)."""
        engine = self._engine()
        with self._no_grad_reference(model) as ref, self.accelerator.autocast():
            out = engine.compute_logps(ref, inputs, with_grad=False, token_stats=engine.policy_token_stats)
        return out["chosen_logps"], out["rejected_logps"]

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
            cache = self._build_ref_cache(dataset, batch_size, path, model_hash[0], settings)
        chosen, rejected = cache.values_for(keys)
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
            "ref_rejected_logps", rejected.tolist()
        )

    def _build_ref_cache(
        self, dataset: Any, batch_size: int, path: str, model_hash: str, settings: Mapping[str, Any]
    ) -> RefLogpCache:
        """Compute the reference log-probs of ``dataset``, each rank its shard of the loader ``accelerate``
        prepares, and have rank 0 write them to ``path`` (:meth:`RefLogpCache.build_distributed`)."""
        from torch.utils.data import DataLoader

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
        return RefLogpCache.build_distributed(
            lambda batch: self.compute_ref_log_probs(model, batch),
            loader,
            path,
            model_hash=model_hash,
            settings=settings,
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
