"""The distributed setups :class:`~fastdpo.integrations.trl.FastDPOTrainer` trains under, and the ones it refuses.

Supported: one process; DDP (``MULTI_CPU`` / ``MULTI_GPU``); DeepSpeed ZeRO stages 0-3 (``DPOConfig(deepspeed=...)``
or an accelerate DeepSpeed config); FSDP2 (``fsdp_version: 2``); fastdpo's own sequence parallelism
(``sequence_parallel_size=k``) on DDP, whose ``k`` ranks of a group see the same batches
(:func:`shard_over_data_parallel`).

Refused with a ``NotImplementedError`` naming the setting, twice: from the arguments and the launcher's environment
before any model is loaded or any row tokenized (:func:`check_distributed_config`,
:func:`check_sequence_parallel_args`), and from the accelerator's state after ``DPOTrainer.__init__``
(:func:`check_accelerator`): FSDP1; tensor parallelism (``parallelism_config`` ``tp_size``, DeepSpeed AutoTP, a
``tp_plan``); context / sequence parallelism through accelerate's ``parallelism_config`` or DeepSpeed; HSDP; other
distributed types (XLA, ...); ``torch_compile`` with several processes; sequence parallelism with DeepSpeed / FSDP,
with ``precompute_ref_log_probs``, or over a process count it does not divide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from trl import DPOConfig

__all__ = ["check_accelerator", "check_distributed_config", "check_sequence_parallel_args", "shard_over_data_parallel"]


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


def check_sequence_parallel_args(size: Any, args: DPOConfig) -> None:
    """Refuse an invalid ``sequence_parallel_size`` (``ValueError``: not a positive int) and, for ``size > 1``, the
    settings sequence parallelism is not validated with (``NotImplementedError``: ``precompute_ref_log_probs``, a
    DeepSpeed or FSDP config), from the arguments alone."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"sequence_parallel_size must be a positive int, got {size!r}")
    if size > 1 and args.precompute_ref_log_probs:
        raise NotImplementedError(
            "precompute_ref_log_probs with sequence_parallel_size > 1: TRL precomputes over a loader sharded over "
            "every rank, but the ranks of a sequence-parallel group must see the same batches; precompute with "
            "sequence_parallel_size=1 (or DPOEngine.precompute_reference) and train on the stored columns"
        )
    if size > 1 and (getattr(args, "deepspeed_plugin", None) is not None or _requested_fsdp_version(args) is not None):
        raise NotImplementedError(
            f"sequence_parallel_size={size} with DeepSpeed or FSDP: fastdpo's sequence "
            "parallelism is validated on DDP (MULTI_CPU/MULTI_GPU) only; launch it without a DeepSpeed/FSDP config"
        )


def check_accelerator(
    accelerator: Any, *, deepspeed: bool, fsdp: bool, torch_compile: bool, sequence_parallel_size: int
) -> None:
    """Refuse the multi-process setups that are not supported, from the accelerator's state (the same checks as
    :func:`check_distributed_config`, which runs on the arguments before anything is loaded): DDP
    (``MULTI_CPU``/``MULTI_GPU``), DeepSpeed ZeRO stages 0-3 and FSDP2 run multi-process; ``deepspeed`` / ``fsdp``
    say whether the trainer enabled them."""
    from accelerate.utils import DistributedType

    ddp = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if deepspeed:
        _check_deepspeed_config(getattr(getattr(accelerator.state, "deepspeed_plugin", None), "deepspeed_config", {}))
    if fsdp:
        _check_fsdp_version(getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 1))
    config = accelerator.parallelism_config
    if config is not None:
        _check_parallelism_sizes(config, fsdp2=fsdp)
    processes, kind = accelerator.num_processes, accelerator.distributed_type
    if processes > 1:
        if kind not in (*ddp, DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise NotImplementedError(
                f"distributed type {kind} ({processes} processes): FastDPOTrainer runs "
                "DDP (MULTI_CPU, MULTI_GPU), DeepSpeed ZeRO and FSDP2 only"
            )
        if torch_compile:
            raise NotImplementedError(
                "torch_compile with several processes: the compiled wrapper around DDP is not validated with "
                "FastDPOTrainer; train multi-process without torch_compile"
            )
    sp = sequence_parallel_size
    if sp > 1 and (processes % sp or kind not in ddp):
        raise ValueError(
            f"sequence_parallel_size={sp} needs a multi-process DDP launch (MULTI_CPU/MULTI_GPU) whose process "
            f"count is a multiple of it; got {processes} process(es), {kind}"
        )


def shard_over_data_parallel(loader: Any, num_shards: int, shard: int) -> None:
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
