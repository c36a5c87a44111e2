"""FastDPOTrainer's distributed-setup checks (single process, no launch).

Unsupported setups are refused by ``FastDPOTrainer.__init__`` before any model is loaded or any row tokenized,
naming the setting; the supported ones (DeepSpeed ZeRO stages 0-3 with offload / ZeRO++ hpZ, FSDP2) pass the
check. What runs under each supported setup is tested in ``tests/test_trl_multiprocess.py`` and
``tests/test_sharded_engine.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")
datasets = pytest.importorskip("datasets")

from fastdpo.tiny import preference_rows

MISSING_MODEL = "fastdpo-tests/this-model-does-not-exist"


def _ds(**extra: Any) -> dict[str, Any]:
    return {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", **extra}


REFUSED = {
    "deepspeed_autotp": ({"deepspeed": _ds(tensor_parallel={"autotp_size": 2})}, {}, "tensor_parallel"),
    "deepspeed_sequence_parallel": ({"deepspeed": _ds(sequence_parallel_size=2)}, {}, "sequence_parallel_size"),
    "fsdp1_args": ({"fsdp": True, "fsdp_config": {"version": 1}}, {}, "FSDP version 1"),
    "fsdp1_accelerate_env": ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
    "tensor_parallel_env": ({}, {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"}, "tp"),
    "tp_plan": ({"model_init_kwargs": {"tp_plan": "auto"}}, {}, "tp_plan"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_model_load_and_tokenization(name, tmp_path, monkeypatch):
    """The model is a hub id that does not exist (loading it would raise ``OSError``) and tokenizing the dataset
    raises: the ``NotImplementedError`` naming the setting must come first."""
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer

    kwargs, env, match = REFUSED[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)

    def no_tokenizing(*a: Any, **k: Any) -> Any:
        raise AssertionError("the dataset was processed before the setup was refused")

    monkeypatch.setattr(datasets.Dataset, "map", no_tokenizing)
    with pytest.raises(NotImplementedError, match=match):
        FastDPOTrainer(model=MISSING_MODEL, args=args, train_dataset=datasets.Dataset.from_list(preference_rows(2)))


@pytest.mark.parametrize(
    "zero",
    [
        {"stage": 0},
        {"stage": 1},
        {"stage": 2},
        {"stage": 3},
        {"stage": 3, "zero_hpz_partition_size": 2},
        {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
    ],
    ids=["zero0", "zero1", "zero2", "zero3", "zero3_hpz", "zero3_offload"],
)
def test_deepspeed_zero_configs_pass_the_check(zero, tmp_path):
    from trl import DPOConfig

    from fastdpo.integrations.trl import check_distributed_config

    args = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        deepspeed={"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto"},
    )
    check_distributed_config(args)


def test_fsdp2_passes_the_check(tmp_path, monkeypatch):
    from trl import DPOConfig

    from fastdpo.integrations.trl import check_distributed_config

    check_distributed_config(
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", fsdp=True, fsdp_config={"version": 2})
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_distributed_config(DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


@pytest.mark.parametrize(
    "kwargs", [{"deepspeed": _ds()}, {"fsdp": True, "fsdp_config": {"version": 2}}], ids=["zero3", "fsdp2"]
)
def test_sequence_parallel_with_sharding_refused_before_model_load(kwargs, tmp_path, monkeypatch):
    """fastdpo's own sequence parallelism is validated on DDP only: with a ZeRO / FSDP2 config it is refused in
    ``__init__`` before the model (a hub id that does not exist) is loaded or the data tokenized."""
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer

    monkeypatch.setattr(datasets.Dataset, "map", lambda *a, **k: pytest.fail("the dataset was processed"))
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    with pytest.raises(NotImplementedError, match="sequence_parallel_size=2 with DeepSpeed or FSDP"):
        FastDPOTrainer(
            model=MISSING_MODEL,
            args=args,
            train_dataset=datasets.Dataset.from_list(preference_rows(2)),
            sequence_parallel_size=2,
        )
