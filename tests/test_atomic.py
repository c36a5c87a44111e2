"""Crash safety of what fastdpo writes to disk, and refusal of a mismatched reference cache.

- :meth:`fastdpo.ref_cache.RefLogpCache.save` and ``fastdpo train`` checkpoints
  (:func:`fastdpo.run_state.save_checkpoint`)
  must replace their file atomically: a writer that dies mid-write (an exception inside ``torch.save``, or a
  ``SIGKILL`` of the writing process while half the bytes are on disk) leaves the previous file byte-for-byte intact
  and loadable.
- ``fastdpo train`` killed in the middle of writing a checkpoint resumes from the previous one with ``--resume``.
- :meth:`RefLogpCache.load` refuses a cache made for another reference model, another dataset or other settings.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache(n: int, version: float, model_hash: str = "model-a") -> Any:
    from fastdpo.ref_cache import RefLogpCache

    keys = [f"{i:032x}" for i in range(n)]
    values = torch.full((n, 2), version) + torch.arange(n, dtype=torch.float32).unsqueeze(1) * 1e-3
    return RefLogpCache(keys, values, model_hash=model_hash, settings={"ld_alpha": None, "temperature": 1.0})


class _HalfWriteError(RuntimeError):
    pass


def _half_then_raise(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """A ``torch.save`` that writes the first half of the real bytes, then dies."""
    buf = io.BytesIO()
    _REAL_SAVE(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])
        f.flush()
    raise _HalfWriteError("simulated crash in the middle of torch.save")


_REAL_SAVE = torch.save


# ---------------------------------------------------------------------------------------------------------------
# Reference-log-prob cache
# ---------------------------------------------------------------------------------------------------------------


def test_ref_cache_roundtrip(tmp_path: Path) -> None:
    from fastdpo.ref_cache import RefLogpCache

    cache = _cache(37, 1.0)
    path = tmp_path / "ref.pt"
    cache.save(path)
    loaded = RefLogpCache.load(path, model_hash="model-a", data_hash=cache.data_hash)
    assert loaded.keys == cache.keys
    assert torch.equal(loaded.values, cache.values)
    assert loaded.model_hash == cache.model_hash and loaded.data_hash == cache.data_hash


def test_ref_cache_exception_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastdpo.ref_cache import RefLogpCache

    path = tmp_path / "ref.pt"
    old = _cache(50, 1.0)
    old.save(path)
    before = _sha(path)
    monkeypatch.setattr(torch, "save", _half_then_raise)
    with pytest.raises(_HalfWriteError):
        _cache(80, 2.0).save(path)
    monkeypatch.setattr(torch, "save", _REAL_SAVE)
    assert _sha(path) == before, "the old cache file was modified by a failed save"
    loaded = RefLogpCache.load(path)
    assert torch.equal(loaded.values, old.values)
    assert sorted(os.listdir(tmp_path)) == ["ref.pt"], "a failed save left temporary files behind"


def test_ref_cache_exception_on_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ref.pt"
    monkeypatch.setattr(torch, "save", _half_then_raise)
    with pytest.raises(_HalfWriteError):
        _cache(20, 1.0).save(path)
    assert not path.exists(), "a failed first save left a truncated cache at the target path"
    assert os.listdir(tmp_path) == []


_KILL_CHILD = textwrap.dedent(
    """
    import io, os, sys, time, torch
    real_save = torch.save
    calls = []

    def should_pause(obj):
        # argv[2]: "call:N" pauses the (N+1)-th save; "step:S" pauses the save of a dict whose "step" is S
        kind, value = sys.argv[2].split(":")
        if kind == "call":
            calls.append(1)
            return len(calls) > int(value)
        return isinstance(obj, dict) and obj.get("step") == int(value)

    def paused_save(obj, f, *args, **kwargs):
        # saves go through until should_pause(obj); that one writes half its bytes, says so, and hangs
        if not should_pause(obj):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        print("MIDWRITE", flush=True)
        time.sleep(120)
        fh.write(data[len(data) // 2 :])

    torch.save = paused_save
    """
)


def _run_until_midwrite(code: str, args: list[str], timeout: float = 120.0) -> subprocess.Popen:
    """Start ``python -c code *args``; return once it printed MIDWRITE (it is then hanging half-way into a write)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(REPO),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.monotonic() + timeout
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == "MIDWRITE":
            return proc
    proc.kill()
    proc.wait()
    raise AssertionError("child never reached the paused write:\n" + "".join(seen)[-4000:])


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if proc.stdout is not None:
        proc.stdout.close()


def test_ref_cache_survives_sigkill_mid_write(tmp_path: Path) -> None:
    from fastdpo.ref_cache import RefLogpCache

    path = tmp_path / "ref.pt"
    code = _KILL_CHILD + textwrap.dedent(
        """
        import torch
        from fastdpo.ref_cache import RefLogpCache
        path = sys.argv[1]
        for version, n in ((1.0, 400), (2.0, 900)):
            keys = [f"{i:032x}" for i in range(n)]
            values = torch.full((n, 2), version) + torch.arange(n, dtype=torch.float32).unsqueeze(1) * 1e-3
            RefLogpCache(keys, values, model_hash="model-a").save(path)
            print("SAVED", version, flush=True)
        """
    )
    proc = _run_until_midwrite(code, [str(path), "call:1"])
    before = _sha(path)
    _sigkill(proc)
    assert _sha(path) == before, "killing the writer changed the existing cache file"
    loaded = RefLogpCache.load(path, model_hash="model-a")
    assert len(loaded) == 400
    assert torch.allclose(loaded.values[:, 0], 1.0 + torch.arange(400) * 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Refusing a mismatched cache
# ---------------------------------------------------------------------------------------------------------------


def _tiny_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Embedding(23, 8), torch.nn.Linear(8, 23))
    b = torch.nn.Sequential(torch.nn.Embedding(23, 8), torch.nn.Linear(8, 23))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[1].weight[3, 2] += 1e-3  # one weight differs
    return a, b


def test_ref_cache_refuses_other_model_dataset_settings(tmp_path: Path) -> None:
    from fastdpo.ref_cache import RefLogpCache, dataset_fingerprint, model_fingerprint

    model_a, model_b = _tiny_models()
    cache = _cache(30, 1.0, model_hash=model_fingerprint(model_a))
    path = tmp_path / "ref.pt"
    cache.save(path)

    ok = RefLogpCache.load(path, model=model_a, data_hash=dataset_fingerprint(cache.keys), settings=cache.settings)
    assert torch.equal(ok.values, cache.values)
    # order and duplicates do not change the dataset fingerprint
    assert dataset_fingerprint(list(reversed(cache.keys)) + cache.keys[:3]) == cache.data_hash

    with pytest.raises(ValueError, match="another model"):
        RefLogpCache.load(path, model=model_b)
    other_keys = cache.keys[:-1] + ["f" * 32]
    with pytest.raises(ValueError, match="another dataset"):
        RefLogpCache.load(path, model=model_a, data_hash=dataset_fingerprint(other_keys))
    with pytest.raises(ValueError, match="settings"):
        RefLogpCache.load(path, model=model_a, settings={"ld_alpha": 0.5, "temperature": 1.0})


def test_ref_cache_refuses_other_dataset_batches(tmp_path: Path) -> None:
    """Through collated batches: a cache built on one dataset refuses batches (and lookups) of another."""
    from fastdpo import PreferenceCollator, tiny

    make_tokenizer, preference_rows = tiny.make_tokenizer, tiny.preference_rows
    from fastdpo.ref_cache import RefLogpCache

    tok = make_tokenizer()
    collate = PreferenceCollator(tok)
    rows = preference_rows(6, seed=1)
    batches = [collate(rows[:3]), collate(rows[3:])]
    gen = torch.Generator().manual_seed(0)

    def compute(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        p = int(batch["num_pairs"])
        return -torch.rand(p, generator=gen) * 10, -torch.rand(p, generator=gen) * 10

    cache = RefLogpCache.build(compute, batches, model_hash="m")
    path = tmp_path / "ref.pt"
    cache.save(path)
    # the same pairs batched differently are the same dataset, and lookups find them
    same = [collate(rows[:2]), collate(rows[2:])]
    loaded = RefLogpCache.load(path, batches=same)
    c, r = loaded.lookup(collate([rows[4], rows[0]]))
    torch.testing.assert_close(c, torch.stack([cache.values[4, 0], cache.values[0, 0]]))
    torch.testing.assert_close(r, torch.stack([cache.values[4, 1], cache.values[0, 1]]))

    other = preference_rows(6, seed=2)
    with pytest.raises(ValueError, match="another dataset"):
        RefLogpCache.load(path, batches=[collate(other)])
    with pytest.raises(ValueError, match="not in the reference cache"):
        loaded.lookup(collate(other[:2]))


def test_engine_precomputed_cache_refuses_mismatch(tmp_path: Path) -> None:
    """``DPOEngine.precompute_reference`` writes a cache that a precomputed-reference engine accepts for the same
    reference model and settings (same loss as the live reference) and refuses for another model, other settings or
    pairs of another dataset."""
    import copy

    from fastdpo import DPOEngine, PreferenceCollator, tiny

    tok = tiny.make_tokenizer()
    policy = tiny.make_model("llama", tok, attn_implementation="eager", seed=0)
    ref = tiny.make_model("llama", tok, attn_implementation="eager", seed=1)
    other_ref = copy.deepcopy(ref)
    with torch.no_grad():
        other_ref.lm_head.weight[5, 3] += 1e-3
    collate = PreferenceCollator(tok)
    rows = tiny.preference_rows(4, seed=21)
    batches = [collate(rows[:2]), collate(rows[2:])]
    path = tmp_path / "ref.pt"
    live = DPOEngine(policy, ref, loss_type="sigmoid", beta=0.1)
    live.precompute_reference(batches, path)
    assert path.is_file() and sorted(os.listdir(tmp_path)) == ["ref.pt"]

    cached = DPOEngine(policy, ref_model=ref, reference="precomputed", ref_cache=path, loss_type="sigmoid", beta=0.1)
    with torch.no_grad():
        loss_live, _ = live.step(batches[1])
        loss_cached, _ = cached.step(batches[1])
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="another model"):
        DPOEngine(policy, ref_model=other_ref, reference="precomputed", ref_cache=path)
    with pytest.raises(ValueError, match="settings"):
        DPOEngine(policy, ref_model=ref, reference="precomputed", ref_cache=path, ld_alpha=0.5)
    other = collate(tiny.preference_rows(2, seed=99))
    with pytest.raises(ValueError, match="not in the reference cache"):
        cached.step(other)


# ---------------------------------------------------------------------------------------------------------------
# fastdpo train checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_save_checkpoint_exception_mid_write_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastdpo.run_state import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    old_state = {"step": 3, "model": {"w": torch.randn(17, 5)}}
    save_checkpoint(path, old_state)
    before = _sha(path)
    monkeypatch.setattr(torch, "save", _half_then_raise)
    with pytest.raises(_HalfWriteError):
        save_checkpoint(path, {"step": 4, "model": {"w": torch.randn(170, 5)}})
    monkeypatch.setattr(torch, "save", _REAL_SAVE)
    assert _sha(path) == before
    got = torch.load(path, weights_only=True)
    assert got["step"] == 3 and torch.equal(got["model"]["w"], old_state["model"]["w"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"], "a failed save left temporary files behind"


_TRAIN_ARGS = [
    "--steps", "4", "--save-every", "2", "--eval-every", "0", "--eval-batches", "1", "--eval-batch-size", "4",
    "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--vocab-size", "262", "--log-every", "0",
    "--no-progress", "--seed", "3",
]  # fmt: skip


def test_train_killed_mid_checkpoint_resumes(tmp_path: Path) -> None:
    """``fastdpo train`` SIGKILLed half-way through writing its step-4 checkpoint keeps the step-2 one, and
    ``--resume`` continues from it to the end."""
    out = tmp_path / "run"
    code = _KILL_CHILD + textwrap.dedent(
        """
        from fastdpo.train import main
        sys.exit(main(sys.argv[3:]))
        """
    )
    # the step-2 checkpoint is written normally; the step-4 one hangs half-written until the SIGKILL
    proc = _run_until_midwrite(code, ["-", "step:4", "--output-dir", str(out), *_TRAIN_ARGS], timeout=240)
    ckpt = out / "checkpoint.pt"
    before = _sha(ckpt)
    _sigkill(proc)
    assert _sha(ckpt) == before, "killing the trainer mid-save changed checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["step"] == 2
    # the killed writer's half-written temporary file is there; it may not outlive the next start
    assert len([p for p in out.iterdir() if p.name.endswith(".tmp")]) == 1

    from fastdpo.train import main

    rc = main(["--output-dir", str(out), "--resume", *_TRAIN_ARGS])
    assert rc == 0
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == [], "temporary files left behind"
    final = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert final["step"] == 4
    for name, value in final["model"].items():
        assert torch.isfinite(value).all(), name
