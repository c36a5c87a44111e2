"""Sequence parallelism (issue 17): Ulysses attention + sequence-sharded fused head against the single process.

Two launches of ``tests/sp_worker.py`` (module-scoped, each runs every job in one go): 2 gloo ranks with
``sequence_parallel_size=2`` (tiny Llama / Qwen2 / Gemma2 x pad / padding_free / prefix_shared, plus a batch whose
second half is all padding, gradient checkpointing, one key/value head, DDP and FSDP2 over both ranks, a mismatched
batch, the reduction's gradient convention), and 4 ranks with data-parallel 2 x sequence-parallel 2 under DDP and
FSDP2. Every rank's loss, per-sequence log-probs, metrics and every parameter gradient must equal the single-process
step on the same batch (rank 0 computes it in the same worker) to rel 1e-5 (fp32). The rest runs in-process: errors
raised before any collective, the attention implementation outside a sequence-parallel step, the batch padding.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sp_worker  # tests/ is on sys.path (conftest.py)
import torch
import torch.distributed as dist
from launch import needs_gloo, run_ranks, torchrun  # tests/ is on sys.path (conftest.py)

WORKER = Path(__file__).with_name("sp_worker.py")
TIMEOUT_S = 300

PLAIN_CASES = sorted(sp_worker.CASES)
REL = 1e-5


def launch(out_dir: Path, world: int, sp: int, jobs: list[str], singles: list[str]) -> list[dict[str, Any]]:
    """Run ``world`` ranks of the worker to completion; their result dicts in rank order (fails with their logs)."""
    init = out_dir / "init"
    return run_ranks(
        [
            [
                sys.executable,
                str(WORKER),
                f"--rank={rank}",
                f"--world-size={world}",
                f"--sp={sp}",
                f"--init-file={init}",
                f"--out={out_dir}",
                "--jobs",
                *jobs,
                "--singles",
                *singles,
            ]
            for rank in range(world)
        ],
        out_dir,
        TIMEOUT_S,
    )


def _launch_once(
    tmp_path_factory: Any, name: str, world: int, jobs: list[str], singles: list[str]
) -> list[dict[str, Any]]:
    """:func:`launch` once per test session, also under pytest-xdist: the workers share the session's base temporary
    directory, the first one to take the lock runs the ranks, the others load what it wrote (the pytest-xdist recipe
    for session fixtures)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / f"fastdpo-sp-{name}"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").is_file():
            out.mkdir(exist_ok=True)
            launch(out, world, 2, jobs, singles)
            (out / "done").touch()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# fastdpo memory --sequence-parallel: (preset, dtype) per architecture; Qwen's tiny copy has 2 key/value heads per rank
SAVED = [
    f"saved:{preset}-{dtype}-{packing}"
    for preset, dtype in (("Llama-3.2-1B", "fp32"), ("Qwen2.5-0.5B", "bf16"), ("Gemma-2-2B", "fp32"))
    for packing in ("padding_free", "prefix_shared")
]


@pytest.fixture(scope="session")
def sp2(tmp_path_factory) -> list[dict[str, Any]]:
    jobs = [f"{case}:plain" for case in PLAIN_CASES]
    jobs += [
        "llama-prefix_shared:ddp",
        "gemma2-pad:fsdp2",
        "qwen2-pad:nosync",
        "llama-pad:mismatch",
        "llama-pad:ddp_subgroup",
        "sum_over_group:grad",
        *SAVED,
    ]
    return _launch_once(tmp_path_factory, "sp2", 2, jobs, PLAIN_CASES)


@pytest.fixture(scope="session")
def dp2_sp2(tmp_path_factory) -> list[dict[str, Any]]:
    return _launch_once(
        tmp_path_factory,
        "dp2sp2",
        4,
        ["llama-prefix_shared:ddp", "gemma2-pad:fsdp2", "qwen2-padding_free:hsdp"],
        ["llama-prefix_shared", "gemma2-pad", "qwen2-padding_free"],
    )


def _ok(result: dict[str, Any], what: str) -> dict[str, Any]:
    assert "error" not in result, f"{what}: {result.get('traceback', result.get('error'))}"
    return result


def _assert_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(ref), f"{what}: parameters with gradients differ: {set(got) ^ set(ref)}"
    for name, g in ref.items():
        # rel 1e-5 of the tensor's scale (entries near 0 are compared at that absolute level)
        torch.testing.assert_close(
            got[name],
            g,
            rtol=REL,
            atol=REL * float(g.abs().max()),
            msg=lambda m, name=name: f"{what}: grad {name}: {m}",
        )


def _assert_step(got: dict[str, Any], ref: dict[str, Any], what: str, *, pairs: slice | None = None) -> None:
    """Loss, per-sequence log-probs and metrics of one rank against the single process (``pairs``: the slice of
    the single process's pairs this rank's data-parallel group holds)."""
    if pairs is None:
        assert got["loss"] == pytest.approx(ref["loss"], rel=REL), what
        for key, value in ref["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=REL, abs=1e-6), f"{what}: metric {key}"
    for key in ("chosen", "rejected"):
        want = torch.tensor(ref[key], dtype=torch.float64)
        if pairs is not None:
            want = want[pairs]
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=torch.float64),
            want,
            rtol=REL,
            atol=1e-5,
            msg=lambda m, key=key: f"{what}: {key} log-probs: {m}",
        )


# ------------------------------------------------------------------------------------------------ 2 ranks, sp=2
@needs_gloo
def test_cases_cover_boundary_padding_and_odd_lengths(sp2: list[dict[str, Any]]) -> None:
    """The batches really contain what the issue asks for: an odd total length, a completion crossing the shard
    boundary (a token predicted by the last position of shard 0), a row whose second shard is only padding, a batch
    whose whole second shard is padding (rank 1 scores nothing), and more key/value heads needed than the model has."""
    from fastdpo.sequence_parallel import token_owners

    for case in PLAIN_CASES:
        batch = _ok(sp2[0][f"single:{case}"], case)["batch"]
        length = batch["input_ids"].shape[1]
        ls = math.ceil(length / 2)
        col = batch["logp_index"] % length
        if "allpad" in case:
            assert bool((batch["token_seq"][:, ls:] < 0).all()), case
            assert _ok(sp2[1][f"{case}:plain"], case)["owned"] == 0
            continue
        assert length % 2 == 1, f"{case}: L={length} should be odd"
        assert bool((col == ls - 1).any()), f"{case}: no token predicted across the shard boundary"
        owners = token_owners(batch["logp_index"], length, 2)
        crossing = [s for s in range(2 * batch["num_pairs"]) if owners[batch["logp_seq"] == s].unique().numel() == 2]
        assert crossing, f"{case}: no completion split between the ranks"
        if batch["packing"] == "pad":
            assert bool(((batch["token_seq"][:, ls:] < 0).all(dim=1)).any()), f"{case}: no all-padding shard"
        got = [_ok(sp2[r][f"{case}:plain"], case)["owned"] for r in range(2)]
        assert sum(got) == batch["logp_index"].numel() and min(got) > 0, (case, got)


@needs_gloo
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_matches_single_process(sp2: list[dict[str, Any]], case: str) -> None:
    """No wrapper + ``engine.reduce_sequence_parallel_gradients()``: both ranks give the single-process loss,
    log-probs, metrics and every parameter gradient."""
    ref = _ok(sp2[0][f"single:{case}"], f"single {case}")
    for rank in range(2):
        got = _ok(sp2[rank][f"{case}:plain"], f"{case} rank {rank}")
        assert got["attn"].startswith("fastdpo_ulysses_")
        _assert_step(got, ref, f"{case} rank {rank}")
        _assert_grads(got["grads"], ref["grads"], f"{case} rank {rank}")


@needs_gloo
@pytest.mark.parametrize("job", ["llama-prefix_shared:ddp", "gemma2-pad:fsdp2"])
def test_wrapper_over_all_ranks_reduces(sp2: list[dict[str, Any]], job: str) -> None:
    """DistributedDataParallel / FSDP2 over the sequence-parallel ranks: their gradient mean is the single-process
    gradient with no extra call."""
    ref = _ok(sp2[0][f"single:{job.split(':')[0]}"], job)
    for rank in range(2):
        got = _ok(sp2[rank][job], f"{job} rank {rank}")
        _assert_step(got, ref, f"{job} rank {rank}")
        _assert_grads(got["grads"], ref["grads"], f"{job} rank {rank}")


@needs_gloo
def test_unreduced_gradients_differ(sp2: list[dict[str, Any]]) -> None:
    """Without the reduction each rank's gradient is not the single-process one: the comparisons above can fail."""
    ref = sp2[0]["single:qwen2-pad"]["grads"]
    for rank in range(2):
        got = _ok(sp2[rank]["qwen2-pad:nosync"], "nosync")["grads"]
        worst = max(float((got[n] - g).abs().max() / g.abs().max()) for n, g in ref.items())
        assert worst > 1e-2, f"rank {rank}'s own gradient already equals the single-process one ({worst})"


@needs_gloo
def test_ranks_with_different_batches_refused(sp2: list[dict[str, Any]]) -> None:
    for rank in range(2):
        err = sp2[rank]["llama-pad:mismatch"].get("error", "")
        assert err.startswith("ValueError") and "same collated batch" in err, err


@needs_gloo
def test_ddp_over_part_of_the_ranks_refused(sp2: list[dict[str, Any]]) -> None:
    for rank in range(2):
        err = sp2[rank]["llama-pad:ddp_subgroup"].get("error", "")
        assert err.startswith("ValueError") and "spans 1 of 2 ranks" in err, err


@needs_gloo
def test_sum_over_group_backward_is_scaled_identity(sp2: list[dict[str, Any]]) -> None:
    """Forward: the sum over the ranks. Backward: each rank's addend gets k (= 2) times its own loss gradient -- with
    rank-dependent losses, not the ranks' summed gradient an autograd all-reduce would return."""
    base = [1.0, -2.0, 3.0, 0.5, 4.0]
    for rank in range(2):
        got = _ok(sp2[rank]["sum_over_group:grad"], "sum_over_group")
        assert got["sum"] == [10.0, 12.0, 14.0, 16.0, 18.0]
        assert got["grad"] == [2 * (rank + 1) * w for w in base]


# ------------------------------------------------------------------------------------------------ 4 ranks, dp=2 x sp=2
@needs_gloo
@pytest.mark.parametrize("job", ["llama-prefix_shared:ddp", "gemma2-pad:fsdp2", "qwen2-padding_free:hsdp"])
def test_data_parallel_times_sequence_parallel(dp2_sp2: list[dict[str, Any]], job: str) -> None:
    """World 4 = dp 2 x sp 2: ranks {0, 1} and {2, 3} each hold half of the pairs; the wrapper over all 4 ranks
    (DDP, FSDP2 on a 1-D mesh, or HSDP on a 2-D ("dp", "sp") mesh that is also the engine's sequence-parallel group)
    gives the single-process full-batch gradient, each group the loss and log-probs of its pairs."""
    case = job.split(":")[0]
    ref = _ok(dp2_sp2[0][f"single:{case}"], f"single {case}")
    per = len(ref["chosen"]) // 2
    losses = []
    for rank in range(4):
        got = _ok(dp2_sp2[rank][job], f"{job} rank {rank}")
        dp = rank // 2
        _assert_step(got, ref, f"{job} rank {rank}", pairs=slice(dp * per, (dp + 1) * per))
        _assert_grads(got["grads"], ref["grads"], f"{job} rank {rank}")
        losses.append(got["loss"])
    assert losses[0] == losses[1] and losses[2] == losses[3]
    assert (losses[0] + losses[2]) / 2 == pytest.approx(ref["loss"], rel=REL)


# ------------------------------------------------------------------------------------------------ trainer
TRAINER_WORKER = Path(__file__).with_name("sp_trainer_worker.py")
_SKIP_LOG = {"epoch", "step", "learning_rate", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


@pytest.fixture(scope="session")
def trainer_runs(tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``FastDPOTrainer(sequence_parallel_size=2)`` on 4 processes (torchrun, accelerate MULTI_CPU: dp 2 x sp 2,
    2 pairs per data-parallel rank) and the same trainer in one process with 4 pairs per step."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import json

    from filelock import FileLock

    from fastdpo.tiny import preference_rows

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "fastdpo-sp-trainer"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").is_file():
            (out / "multi").mkdir(parents=True, exist_ok=True)
            (out / "single").mkdir(exist_ok=True)
            data, evals = out / "train.jsonl", out / "eval.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(8, seed=3)))
            evals.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(4, seed=11)))
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
            common = [f"--data={data}", f"--eval-data={evals}"]
            runs = [
                (
                    torchrun(4, str(TRAINER_WORKER), "--sp=2", "--batch-size=2", f"--out={out / 'multi'}", *common),
                    "multi",
                ),
                (
                    [
                        sys.executable,
                        str(TRAINER_WORKER),
                        "--sp=1",
                        "--batch-size=4",
                        f"--out={out / 'single'}",
                        *common,
                    ],
                    "single",
                ),
            ]
            for cmd, name in runs:
                proc = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, start_new_session=True
                )
                assert proc.returncode == 0, f"{name} trainer run failed:\n{(proc.stdout + proc.stderr)[-8000:]}"
            (out / "done").touch()
    multi = [torch.load(out / "multi" / f"rank{r}.pt", weights_only=False) for r in range(4)]
    return multi, torch.load(out / "single" / "rank0.pt", weights_only=False)


def _assert_logs(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert set(got) == set(want), what
    for key, value in want.items():
        if key not in _SKIP_LOG and isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=REL, abs=1e-6), f"{what}: {key}"


@needs_gloo
def test_trainer_dp2_sp2_matches_single_process(trainer_runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    """The loaders are sharded over the 2 data-parallel ranks only (both ranks of a sequence-parallel group see the
    same batches, the groups different ones, together the single process's), accelerate's DDP wrapper is used, and
    the logged loss, grad norm, TRL metrics (num_tokens counted once per group), evaluation metrics and the
    parameters after training equal the single-process trainer's."""
    multi, single = trainer_runs
    assert [m["inputs"] for m in multi[::2]] == [m["inputs"] for m in multi[1::2]]  # same batch within a group
    assert multi[0]["inputs"] != multi[2]["inputs"]
    assert [a + b for a, b in zip(multi[0]["inputs"], multi[2]["inputs"])] == single["inputs"]
    for rank, run in enumerate(multi):
        what = f"rank {rank}"
        assert run["num_processes"] == 4 and run["wrapped"] == ["DistributedDataParallel"], what
        assert run["attn"] == "fastdpo_ulysses_sdpa", what
        assert len(run["steps"]) == len(single["steps"]) == sp_trainer_steps(), what
        for got, want in zip(run["steps"], single["steps"]):
            _assert_logs(got, want, f"{what} step {want['step']}")
        _assert_logs(run["eval"], single["eval"], f"{what} eval")
        for name, p in single["params"].items():
            torch.testing.assert_close(
                run["params"][name],
                p,
                rtol=REL,
                atol=REL * float(p.abs().max()),
                msg=lambda m, name=name, what=what: f"{what} param {name}: {m}",
            )


def sp_trainer_steps() -> int:
    import sp_trainer_worker

    return sp_trainer_worker.STEPS


def test_trainer_refuses_what_it_cannot_shard() -> None:
    pytest.importorskip("trl")
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer
    from fastdpo.tiny import make_model, make_tokenizer, preference_rows

    tok = make_tokenizer()
    model = make_model("llama", tok)
    config = DPOConfig("unused", use_cpu=True, bf16=False, report_to="none", precompute_ref_log_probs=True)
    with pytest.raises(NotImplementedError, match="precompute_ref_log_probs with sequence_parallel_size"):
        FastDPOTrainer(model, args=config, processing_class=tok, sequence_parallel_size=2)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="sequence_parallel_size"):
            FastDPOTrainer(model, args=config, processing_class=tok, sequence_parallel_size=bad)
    datasets = pytest.importorskip("datasets")
    config = DPOConfig("unused", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match="needs a multi-process DDP launch"):
        FastDPOTrainer(
            model,
            make_model("llama", tok, seed=1),
            args=config,
            processing_class=tok,
            train_dataset=datasets.Dataset.from_list(preference_rows(2)),
            sequence_parallel_size=2,
        )


# ------------------------------------------------------------------------------------------------ in-process
def test_refusals_before_any_collective() -> None:
    """Errors every rank raises at construction, before a process group is needed."""
    from fastdpo import DPOEngine
    from fastdpo.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    policy, ref = make_model("llama", tok), make_model("llama", tok, seed=1)
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        DPOEngine(policy, ref, sequence_parallel_size=3)
    with pytest.raises(ValueError, match="grad_in_forward"):
        DPOEngine(policy, ref, sequence_parallel_size=2, grad_in_forward=True)
    for bad in (0, -2, True, 2.0, "2"):
        with pytest.raises(ValueError, match="sequence_parallel_size"):
            DPOEngine(policy, ref, sequence_parallel_size=bad)
    with pytest.raises(ValueError, match="sequence_parallel_group needs"):
        DPOEngine(policy, ref, sequence_parallel_group=object())
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed initialized"):
            DPOEngine(policy, ref, sequence_parallel_size=2)
    assert policy.config._attn_implementation == "sdpa"  # nothing was switched by the refused constructions


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_ulysses_model_unchanged_outside_a_step(arch: str, attn: str) -> None:
    """A model switched to ``fastdpo_ulysses_<impl>`` computes exactly what ``<impl>`` does when no sequence-parallel
    context is passed (padding mask built by the model itself) and with a 1-rank context."""
    from fastdpo.tiny import make_model, make_tokenizer
    from fastdpo.ulysses import KWARG, UlyssesContext, enable_ulysses_attention

    tok = make_tokenizer()
    model = make_model(arch, tok, attn_implementation=attn, sliding_window=4 if arch != "llama" else None)
    ids = torch.randint(5, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert enable_ulysses_attention(model, 2) == attn
        assert enable_ulysses_attention(model, 2) == attn  # idempotent
        assert model.config._attn_implementation == f"fastdpo_ulysses_{attn}"
        got = model(input_ids=ids, attention_mask=mask).logits
        pos = torch.arange(11).expand(2, 11)
        one = model(input_ids=ids, attention_mask=mask, **{KWARG: UlyssesContext(None, 1, pos)}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(one, want, rtol=0, atol=0)


def test_local_mask_refused() -> None:
    """A mask for the local columns reaching the attention function raises instead of broadcasting."""
    from fastdpo.tiny import make_model, make_tokenizer
    from fastdpo.ulysses import UlyssesContext, ulysses_attention_forward

    module = make_model("llama", make_tokenizer()).model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    local = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask for 5 keys, but the full sequence has 10"):
        ulysses_attention_forward(
            module, q, kv, kv, local, underlying="sdpa", scaling=0.25, fastdpo_ulysses=UlyssesContext(None, 2)
        )


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
def test_pad_batch_keeps_every_label_and_owner(packing: str) -> None:
    """Padding an odd-length batch to a multiple of k keeps each scored token's predicting position (re-based
    index) and its label next to it; every token is owned by exactly one rank, the one holding that position."""
    from fastdpo import PreferenceCollator
    from fastdpo.sequence_parallel import pad_batch, token_owners
    from fastdpo.tiny import make_tokenizer, preference_rows

    tok = make_tokenizer()
    for k in (2, 3, 4):
        batch = PreferenceCollator(tok, packing=packing)(preference_rows(3, seed=5))
        length = batch["input_ids"].shape[1]
        padded = pad_batch(batch, k)
        lp = padded["input_ids"].shape[1]
        assert lp % k == 0 and lp - length < k
        idx = batch["logp_index"]
        # label t+1 follows predicting position t, before and after padding
        assert torch.equal(batch["input_ids"].flatten()[idx + 1], batch["logp_labels"])
        assert torch.equal(padded["input_ids"].flatten()[padded["logp_index"] + 1], batch["logp_labels"])
        assert bool((padded["token_seq"][:, length:] == -1).all())
        assert bool((padded["attention_mask"][:, length:] == 0).all())
        owners = token_owners(idx, length, k)
        ls = lp // k
        assert torch.equal(owners, padded["logp_index"] % lp // ls)
        assert int(owners.min()) >= 0 and int(owners.max()) < k


@pytest.mark.parametrize(
    "packing,prompt_len,pairs_per_row",
    [("padding_free", 9, 1), ("padding_free", 0, 1), ("prefix_shared", 7, 2), ("prefix_shared", 0, 2)],
)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_owned_tokens_match_the_collated_rows(packing: str, prompt_len: int, pairs_per_row: int, k: int) -> None:
    """The estimator's scored tokens per rank are the engine's (token_owners on the collator's batch; padding_free
    is the collator's "pad" layout of equal rows), also with an empty prompt and a padded last packed row."""
    from fastdpo import PreferenceCollator
    from fastdpo import memory as M
    from fastdpo.sequence_parallel import token_owners
    from fastdpo.sp_memory import owned_tokens
    from fastdpo.tiny import id_tokenizer

    step = M.StepConfig(
        pairs=3,
        prompt_len=prompt_len,
        completion_len=5,
        device="cpu",
        packing=packing,
        pairs_per_row=pairs_per_row,
        sequence_parallel=k,
    )
    rows = [
        {"prompt_input_ids": [5 + i] * prompt_len, "chosen_input_ids": [7] * 5, "rejected_input_ids": [8] * 5}
        for i in range(step.pairs)
    ]
    tok = id_tokenizer(16)
    if packing == "prefix_shared":
        batch = PreferenceCollator(tok, packing=packing, max_tokens_per_row=pairs_per_row * (prompt_len + 10))(rows)
    else:
        batch = PreferenceCollator(tok, packing="pad")(rows)
    assert tuple(batch["input_ids"].shape) == (step.rows, step.seq_len)
    owners = token_owners(batch["logp_index"], step.seq_len, k)
    assert owned_tokens(step) == [int((owners == r).sum()) for r in range(k)]


def test_memory_cli_sequence_parallel(capsys: pytest.CaptureFixture[str]) -> None:
    """The per-rank column: less activation memory than one process, the full-length mask unchanged; bad sizes are
    refused with the CLI's message."""
    from fastdpo import memory as M
    from fastdpo import memory_cli

    shape, _ = M.load_model("Llama-3-8B")
    one = M.StepConfig(pairs=1, prompt_len=16384, completion_len=2048, packing="prefix_shared")
    two = M.StepConfig(pairs=1, prompt_len=16384, completion_len=2048, packing="prefix_shared", sequence_parallel=2)
    e1, e2 = M.estimate(shape, one, "fastdpo"), M.estimate(shape, two, "fastdpo")
    assert e2["activations"] < 0.6 * e1["activations"] and e2["attention_mask"] == e1["attention_mask"]
    assert e2["peak"] < e1["peak"] and e2["head_positions"] == 2 * 2048  # the last rank scores every completion
    assert M.estimate(shape, two, "naive") == M.estimate(shape, one, "naive")  # the peers stay single-process
    assert memory_cli.main(["--model", "Llama-3-8B", "--sequence-parallel", "4", "--packing", "prefix_shared"]) == 0
    assert "sequence-parallel over 4 ranks" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        memory_cli.main(["--sequence-parallel", "0"])
    assert exc.value.code == 2 and "--sequence-parallel: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not divide the model's 32 attention heads"):
        memory_cli.main(["--model", "Llama-3-8B", "--sequence-parallel", "3"])


@pytest.mark.distributed
def test_memory_measure_sequence_parallel_within_15_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--measure`` with ``--sequence-parallel 2``: 2 CPU processes run the real engine step; the peak rank's RSS
    over its baseline is within 15% of the per-rank estimate (a ~0.3 GiB step with a 2560-token prefix_shared row)."""
    from helpers import measure_matches_estimate, measured_prefix_shared_step

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    step = measured_prefix_shared_step(pairs=1, prompt_len=1536, completion_len=512, sequence_parallel=2)
    measured = measure_matches_estimate(step, ["fastdpo"], rel=0.15)["fastdpo"]
    assert len(measured["rank_peaks"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gpu_sp1_path_through_ulysses(attn: str) -> None:
    """One GPU: the Ulysses attention path with a 1-rank context runs the real sdpa / flash-attn kernels and gives
    the plain model's logits (bf16, packed padding_free rows through flash varlen)."""
    import importlib.util

    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from fastdpo import PreferenceCollator
    from fastdpo.attention import build_attention_kwargs
    from fastdpo.tiny import make_model, make_tokenizer, preference_rows
    from fastdpo.ulysses import KWARG, UlyssesContext, enable_ulysses_attention

    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation=attn).to("cuda", torch.bfloat16)
    batch = PreferenceCollator(tok, packing="padding_free")(preference_rows(4, seed=2))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    kwargs = build_attention_kwargs(batch, model)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], **kwargs).logits
        enable_ulysses_attention(model, 1)
        ctx = UlyssesContext(None, 1, batch["position_ids"])
        got = model(input_ids=batch["input_ids"], **kwargs, **{KWARG: ctx}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
