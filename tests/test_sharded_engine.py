"""DPOEngine under DeepSpeed ZeRO-3 and FSDP2 on 2 CPU processes, against the unsharded step on each rank's shard.

One ``torchrun`` launch of ``tests/sharded_engine_worker.py`` runs every scenario (module-scoped fixture). For each,
the tests check that the head weight really was sharded (ZeRO-3: 0 elements outside the gather, a partition smaller
than the weight; FSDP2: a ``DTensor``), that each rank's loss and metrics equal the unsharded step's on that rank's
pairs, that the gradient every rank reads back (ZeRO: ``safe_get_full_grad`` of the partitioned gradient; FSDP2: the
reduce-scattered ``DTensor``) is the mean of the two shards' unsharded gradients -- which only holds when the
fused head's weight gradient reached ZeRO's / FSDP2's reduction (the head's gradient is the largest part and
differs between shards) -- and that the parameters after one SGD step agree. Scenarios cover untied and tied
embeddings, pad / padding_free / prefix_shared packing, a separate reference model (a ZeRO-3 inference engine, as
TRL's ``prepare_deepspeed`` builds it; ``fully_shard`` as TRL's ``prepare_fsdp``), the PEFT adapter-off reference
(LoRA in the body, on the LM head itself, and QLoRA: LoRA on a bitsandbytes 4-bit base), grad_in_forward, LD-DPO + WPO,
and every loss type of TRL 1.16 with and without grad_in_forward.

All-gathers of the head weight are counted in a second step (the steady state) with a vocabulary tile of 64 (6
tiles over V=384, so a gather per tile would show): one per head pass (the reference pass through the policy's head
under the adapter reference, then the policy pass), none per tile. The ZeRO-3 ``base`` scenario also records every
new tensor of the weight's size allocated inside the head's module call and inside the fused backward: exactly the
gather buffer, and the gradient accumulator -- no other copy of the weight.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import MULTI_PROCESS, load_worker, run_launcher, torchrun  # tests/ is on sys.path (conftest.py)

from fastdpo.losses import LOSS_TYPES

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

pytestmark = MULTI_PROCESS

WORKER = Path(__file__).with_name("sharded_engine_worker.py")
WORLD = 2
TIMEOUT_S = 420


W = load_worker(WORKER, "fastdpo_tests_sharded_engine_worker")
QLORA = ["qlora"] if importlib.util.find_spec("bitsandbytes") is not None else []
ZERO3 = [
    "base",
    "tied",
    "padding_free",
    "lora",
    "lora_head",
    "gif_ld_wpo",
    "ld_wpo",
    "gif_lora_tied",
    *QLORA,
    *(f"loss:{t}" for t in LOSS_TYPES),
    *(f"gif_loss:{t}" for t in LOSS_TYPES),
]
FSDP2_ACCELERATE = ["base", "tied", "lora", "gif_ld_wpo", "gif_lora_tied", *QLORA]
FSDP2_LM_HEAD = ["base", "lora_head", "gif_ld_wpo"]
ZERO3_VARIANTS = ["base", "tied", "lora_head"]  # ZeRO++ hpZ, parameter/optimizer offload
JOBS = [
    ("zero3", ZERO3),
    ("zero3_hpz", ZERO3_VARIANTS),
    ("zero3_offload", ZERO3_VARIANTS),
    ("fsdp2_accelerate", FSDP2_ACCELERATE),
    ("fsdp2_lm_head", FSDP2_LM_HEAD),
]
CASES = [(mode, scenario) for mode, scenarios in JOBS for scenario in scenarios]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded_engine")
    cmd = torchrun(
        WORLD, str(WORKER), f"--out={out}", "--jobs", *(f"{mode}:{','.join(scenarios)}" for mode, scenarios in JOBS)
    )
    return run_launcher(cmd, out, WORLD, TIMEOUT_S)


@functools.cache
def _unsharded(scenario: str) -> tuple[dict[str, Any], ...]:
    torch.set_num_threads(1)
    return tuple(W.single_shard_result(scenario, rank, WORLD) for rank in range(WORLD))


@pytest.mark.parametrize("mode,scenario", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_sharded_step_matches_unsharded(results, mode, scenario):
    cfg = W.scenario_config(scenario)
    shards = _unsharded(scenario)
    got = [r[mode][scenario] for r in results]
    for rank, res in enumerate(got):
        assert "error" not in res, f"{mode}/{scenario} failed on rank {rank}:\n{res.get('traceback')}"
        assert res["sharded"], f"{mode}/{scenario}: the head weight was not sharded"
        assert res["loss"] == pytest.approx(shards[rank]["loss"], rel=1e-5, abs=1e-6), (rank, res["loss"])
        assert set(res["metrics"]) == set(shards[rank]["metrics"])
        for key, value in shards[rank]["metrics"].items():
            assert res["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (rank, key)
    # the shards differ, so the mean below is not any single rank's gradient (the check can fail); the head's own
    # parameters (its weight, or its LoRA factors) are among the compared gradients whenever they train
    differ = [
        n for n in shards[0]["grads"] if not torch.allclose(shards[0]["grads"][n], shards[1]["grads"][n], rtol=1e-3)
    ]
    head = [n for n in differ if "lm_head" in n or (cfg["tied"] and "embed_tokens" in n)]
    assert differ and (head or cfg["lora"] in ("body", "qlora")), (differ, sorted(shards[0]["grads"]))
    expected = {n: (shards[0]["grads"][n] + shards[1]["grads"][n]) / 2 for n in shards[0]["grads"]}
    for rank, res in enumerate(got):
        assert set(res["grads"]) == set(expected), (rank, sorted(set(res["grads"]) ^ set(expected)))
        for name, g in expected.items():  # fp32 sums in other orders: rel 1e-4 of the tensor's scale
            torch.testing.assert_close(
                res["grads"][name],
                g,
                rtol=1e-4,
                atol=1e-5 * float(g.abs().max()),
                msg=lambda m, n=name: f"{mode}/{scenario} rank {rank} grad {n}: {m}",
            )
        for name, p in shards[0]["params"].items():
            step = W.LR * expected[name]
            torch.testing.assert_close(
                res["params"][name],
                p - step,
                rtol=1e-4,
                atol=1e-5 * float(step.abs().max()),
                msg=lambda m, n=name: f"{mode}/{scenario} rank {rank} param {n}: {m}",
            )
    # the adapter-off reference leaves every trainable parameter trainable (PEFT + FSDP2: the root/tail group)
    for rank, res in enumerate(got):
        assert res["trainable_after"] == res["trainable_before"], (
            rank,
            sorted(set(res["trainable_before"]) ^ set(res["trainable_after"])),
        )
    # head all-gathers in the steady-state step: one per pass over the head, never one per tile
    passes = 2 if cfg["reference"] == "adapter" else 1
    for rank, res in enumerate(got):
        fwd, bwd = res["head_gathers"]["forward"], res["head_gathers"]["backward"]
        if mode.startswith("zero3"):
            # with tied embeddings the embedding module's own ZeRO fetch gathers the same weight once per pass
            assert 1 <= fwd <= passes * (2 if cfg["tied"] else 1), (rank, res["head_gathers"])
            assert bwd <= 1, (rank, res["head_gathers"])  # ZeRO's pre-backward fetch, unless still gathered
        else:
            assert 1 <= fwd <= passes and bwd == 0, (rank, res["head_gathers"])


@pytest.mark.parametrize("mode", [mode for mode, scenarios in JOBS if "base" in scenarios])
def test_sharded_reference_fingerprint_and_precompute(results, mode):
    """``reference_fingerprint`` of the sharded reference equals the unsharded model's (gathered, never the empty
    ZeRO-3 partitions or a DTensor shard), and ``precompute_reference(shard, path)`` on each rank writes one cache of
    both ranks' pairs (rank 0 writes, no temporary file left) with the unsharded reference's log-probs."""
    from fastdpo.ref_cache import model_fingerprint, pair_keys

    torch.set_num_threads(1)
    cfg = W.scenario_config("base")
    policy, ref, tok = W.build(cfg)
    engine = W.engine_for(policy, ref, cfg)
    expected: dict[str, tuple[float, float]] = {}
    for rank in range(WORLD):
        batch = W.shard_batch(tok, cfg, rank, WORLD)
        with torch.no_grad():
            chosen, rejected = engine.reference_logps(batch)
        expected.update(zip(pair_keys(batch), zip(chosen.tolist(), rejected.tolist())))
    assert len(expected) == len(W.ROWS)
    for rank, res in enumerate(r[mode]["base"] for r in results):
        assert "error" not in res, res.get("traceback")
        assert res["ref_fingerprint"] == model_fingerprint(ref), rank
        assert res["ref_cache_pairs"] == len(W.ROWS) and sorted(res["ref_cache_keys"]) == sorted(expected)
        assert res["ref_cache_tmp_files"] == []
        for key, (c, r_) in zip(res["ref_cache_keys"], res["ref_cache_values"].tolist()):
            assert (c, r_) == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (rank, key)


def test_zero3_no_weight_copy_beyond_the_gather(results):
    """Every new tensor of the head weight's size created inside the head's ZeRO-3 module call (ZeRO's fetch and
    release included) and inside the fused head's backward: the all-gather buffer and the fp32 gradient
    accumulator, nothing else (no ``.contiguous()`` / cast / clone copy of the gathered weight)."""
    numel = 384 * 64
    for rank, res in enumerate(r["zero3"]["base"] for r in results):
        records = res["allocations"]
        forward = [shape for phase, _, shape in records if phase == "forward"]
        backward = [shape for phase, _, shape in records if phase == "backward"]
        assert forward == [(numel,)], (rank, records)  # ZeRO's flat all-gather buffer of the weight
        assert backward == [(384, 64)], (rank, records)  # the gradient accumulator (fp32 weight: no cast copy)
