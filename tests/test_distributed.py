"""2-rank data parallelism on CPU with gloo: DDP and FSDP2 (``fully_shard``) give the single-process DPO step.

Each test launches ``tests/dist_worker.py`` twice (ranks 0 and 1, ``init_method=file://``) and compares what the ranks
wrote against :func:`dist_worker.single_process_result` computed here: the loss averaged over ranks, the gathered
gradients (both wrappers average over ranks, the losses are pair means over equal shares, so the gradient must equal
the full-batch one) and the parameters after one SGD step (identical across ranks, bit for bit under DDP).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import MULTI_PROCESS, load_worker, run_ranks  # tests/ is on sys.path (conftest.py)

pytestmark = MULTI_PROCESS

WORKER = Path(__file__).with_name("dist_worker.py")
WORLD = 2
TIMEOUT_S = 240


def _worker_module() -> Any:
    return load_worker(WORKER, "fastdpo_tests_dist_worker")


def launch(out_dir: Path, jobs: list[str]) -> list[dict[str, Any]]:
    """Run both ranks to completion; return their result dicts (rank order). Fails with the ranks' output."""
    init = out_dir / "init"
    return run_ranks(
        [
            [
                sys.executable,
                str(WORKER),
                f"--rank={rank}",
                f"--world-size={WORLD}",
                f"--init-file={init}",
                f"--out={out_dir}",
                "--jobs",
                *jobs,
            ]
            for rank in range(WORLD)
        ],
        out_dir,
        TIMEOUT_S,
    )


def _check_mode(results: list[dict[str, Any]], mode: str, ref: dict[str, Any], *, bitwise_params: bool) -> None:
    for rank, res in enumerate(results):
        got = res[mode]
        assert "error" not in got, f"{mode} failed on rank {rank}: {got.get('traceback', got['error'])}"
    losses = [res[mode]["loss"] for res in results]
    assert sum(losses) / WORLD == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (mode, losses, ref["loss"])
    for rank, res in enumerate(results):
        grads = res[mode]["grads"]
        assert set(grads) == set(ref["grads"]), f"{mode} rank {rank}: parameters with grads differ"
        for name, g in ref["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode} grad {name}: {m}")
        for name, p in ref["params"].items():
            torch.testing.assert_close(
                res[mode]["params"][name], p, rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode} param {name}: {m}"
            )
    # every rank holds the same model after the step (the gradient really was reduced)
    for name in ref["params"]:
        a, b = results[0][mode]["params"][name], results[1][mode]["params"][name]
        if bitwise_params:
            assert torch.equal(a, b), f"{mode}: parameter {name} differs between ranks after the optimizer step"
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _check_local_grads_differ(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Sanity: each rank's own (unreduced) gradient is NOT the full-batch one, so the comparisons above can fail."""
    for rank, res in enumerate(results):
        local = res["local_grads"]
        assert "error" not in local, f"rank {rank}: {local.get('traceback', local.get('error'))}"
        diff = max(float((local[n] - g).abs().max()) for n, g in ref["grads"].items())
        assert diff > 1e-4, f"rank {rank}'s local gradient already equals the full-batch one; test is vacuous"


@pytest.fixture(scope="module")
def worker() -> Any:
    return _worker_module()


def _launch(tmp_path: Path, scenario: str, modes: str) -> list[dict[str, Any]]:
    """One 2-rank launch per test (self-contained under pytest-xdist); returns the scenario's per-rank results."""
    return [r[scenario] for r in launch(tmp_path, [f"{scenario}:{modes}"])]


def test_head_ddp_and_fsdp2_match_single_process(tmp_path: Path, worker: Any) -> None:
    """Fused head + preference_loss on a toy LM: DDP and FSDP2 (head inside the sharded root's forward)."""
    results = _launch(tmp_path, "head", "ddp,fsdp2")
    ref = worker.single_process_result("head")
    _check_local_grads_differ(results, ref)
    _check_mode(results, "ddp", ref, bitwise_params=True)
    _check_mode(results, "fsdp2", ref, bitwise_params=True)


def test_head_fsdp2_dtensor_weight(tmp_path: Path, worker: Any) -> None:
    """The lm-head weight handed to ``linear_sequence_logprobs`` as the sharded ``DTensor`` FSDP2 leaves outside a
    forward: fastdpo gathers it once per call (DESIGN.md, "Scaling out") and must give the full-batch loss and the
    reduced gradient on every rank. A refusal (an error on any rank, reported by ``_check_mode``), a silently
    unreduced or a local-shard gradient all fail this test."""
    results = _launch(tmp_path, "head", "fsdp2_dtensor")
    ref = worker.single_process_result("head")
    _check_local_grads_differ(results, ref)
    _check_mode(results, "fsdp2_dtensor", ref, bitwise_params=True)


def test_engine_ddp_matches_single_process(tmp_path: Path, worker: Any) -> None:
    """A tiny HF Llama through PreferenceCollator + DPOEngine, the policy wrapped in DistributedDataParallel."""
    results = _launch(tmp_path, "engine", "ddp")
    ref = worker.single_process_result("engine")
    _check_local_grads_differ(results, ref)
    _check_mode(results, "ddp", ref, bitwise_params=True)


def test_engine_fsdp2_matches_single_process(tmp_path: Path, worker: Any) -> None:
    """The same with FSDP2: ``fully_shard`` per decoder layer and on the root (lm-head weight a sharded DTensor)."""
    results = _launch(tmp_path, "engine", "fsdp2")
    ref = worker.single_process_result("engine")
    _check_mode(results, "fsdp2", ref, bitwise_params=True)
