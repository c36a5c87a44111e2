"""The ZeRO-3 and FSDP2 paths on a CUDA machine with one process (``pytest -m gpu``; skipped without CUDA).

World size 1 still goes through the sharding code: ZeRO-3 keeps every parameter at 0 elements outside its gather
(the fused head runs as a call of the head module, ZeRO's hooks gather and reduce-scatter), FSDP2 turns the weights
into ``DTensor``s (accelerate's layout, and a head sharded alone). One ``torchrun --nproc_per_node 1`` launch of
``tests/sharded_engine_worker.py --device cuda`` (NCCL, compiled Triton kernels) runs the scenarios; each is compared
with the unsharded step on the same GPU: loss, metrics, gradients, parameters after SGD, head all-gathers per pass.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import load_worker, torchrun  # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("sharded_engine_worker.py")
JOBS = [
    ("zero3", ["base", "tied", "lora_head", "gif_ld_wpo", "loss:ipo"]),
    ("fsdp2_accelerate", ["base", "lora", "gif_lora_tied"]),
    ("fsdp2_lm_head", ["base", "lora_head"]),
]
CASES = [(mode, scenario) for mode, scenarios in JOBS for scenario in scenarios]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Any, dict[str, Any]]:
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path_factory.mktemp("sharded_gpu")
    cmd = torchrun(1, str(WORKER), f"--out={out}", "--device=cuda", "--jobs", *(f"{m}:{','.join(s)}" for m, s in JOBS))
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    worker = load_worker(WORKER, "fastdpo_tests_sharded_engine_worker_gpu")
    worker.DEVICE = torch.device("cuda", torch.cuda.current_device())
    return worker, torch.load(out / "rank0.pt", weights_only=False)


@functools.cache
def _unsharded(worker: Any, scenario: str) -> dict[str, Any]:
    return worker.single_shard_result(scenario, 0, 1)


@pytest.mark.parametrize("mode,scenario", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_one_gpu_sharded_step_matches_unsharded(run, mode, scenario):
    worker, results = run
    res = results[mode][scenario]
    assert "error" not in res, res.get("traceback")
    assert res["sharded"]
    ref = _unsharded(worker, scenario)
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)
    for key, value in ref["metrics"].items():
        assert res["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert set(res["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(
            res["grads"][name],
            g,
            rtol=1e-3,
            atol=1e-4 * float(g.abs().max()),
            msg=lambda m, n=name: f"{mode}/{scenario} grad {n}: {m}",
        )
    passes = 2 if worker.scenario_config(scenario)["reference"] == "adapter" else 1
    tied = worker.scenario_config(scenario)["tied"]
    assert 1 <= res["head_gathers"]["forward"] <= passes * (2 if tied and mode == "zero3" else 1), res["head_gathers"]
    assert res["head_gathers"]["backward"] <= (1 if mode == "zero3" else 0), res["head_gathers"]
    assert res["trainable_after"] == res["trainable_before"]
