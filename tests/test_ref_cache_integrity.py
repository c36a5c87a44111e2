"""A reference log-prob cache on disk is used only when it is intact (issue 13, items 3 and 11): its payload is
checksummed, so a flipped bit in the values (which silently changed a loss from 0.930 to 2.453 before), a truncated or
an empty file, a file that is no cache, a cache missing fields, or a cache of the old unchecksummed format is a
``ValueError`` naming the file, never a silently different reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastdpo.atomic import CorruptFileError, save_checksummed
from fastdpo.ref_cache import CACHE_FORMAT, RefLogpCache


def _cache(n: int = 40) -> RefLogpCache:
    gen = torch.Generator().manual_seed(5)
    keys = [f"{i:032x}" for i in range(n)]
    return RefLogpCache(
        keys, -torch.rand(n, 2, generator=gen) * 50, model_hash="m", settings={"ld_alpha": None, "temperature": 1.0}
    )


def _flip_bit_in(path: Path, needle: bytes, bit: int = 0x40) -> None:
    """Flip one bit in the middle of ``needle``'s bytes inside the file (a tensor's raw data)."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "tensor bytes not found in the file"
    data[at + len(needle) // 2] ^= bit
    path.write_bytes(bytes(data))


def test_flipped_bit_in_values_is_refused(tmp_path: Path) -> None:
    cache = _cache()
    path = tmp_path / "ref.pt"
    cache.save(path)
    _flip_bit_in(path, cache.values.numpy().tobytes())
    # the file still unpickles fine: only the checksum can tell
    assert torch.load(path, weights_only=True)["values"].shape == (40, 2)
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(path))}.*corrupt.*checksum.*rebuild"):
        RefLogpCache.load(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RefLogpCache.load(path)


def test_engine_refuses_a_corrupted_cache(tmp_path: Path) -> None:
    """Through DPOEngine(reference="precomputed"): the engine never trains against damaged reference log-probs."""
    from fastdpo import DPOEngine, PreferenceCollator
    from fastdpo.tiny import make_model, make_tokenizer, preference_rows

    tok = make_tokenizer()
    policy = make_model("llama", tok, seed=0)
    ref = make_model("llama", tok, seed=1)
    collate = PreferenceCollator(tok)
    batches = [collate(preference_rows(3, seed=11))]
    path = tmp_path / "ref.pt"
    cache = DPOEngine(policy, ref).precompute_reference(batches, path)
    DPOEngine(policy, ref_model=ref, reference="precomputed", ref_cache=path)  # intact: accepted
    _flip_bit_in(path, cache.values.numpy().tobytes(), bit=0x01)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*corrupt"):
        DPOEngine(policy, ref_model=ref, reference="precomputed", ref_cache=path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped key byte"])
def test_damaged_files_name_the_file(tmp_path: Path, damage: str) -> None:
    cache = _cache()
    path = tmp_path / "ref.pt"
    cache.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        key = cache.keys[17].encode()
        at = data.find(key)
        assert at >= 0
        path.write_bytes(data[:at] + key.replace(b"1", b"3", 1) + data[at + len(key) :])
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        RefLogpCache.load(path)


def test_not_a_cache_and_missing_fields(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 definitely not a zip or pickle" * 10)
    with pytest.raises(ValueError, match=rf"{re.escape(str(junk))}.* is not a fastdpo reference cache"):
        RefLogpCache.load(junk)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(ValueError, match=rf"{re.escape(str(a_list))}.*not a fastdpo reference cache.*list"):
        RefLogpCache.load(a_list)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "values": torch.zeros(1, 2)}, other)
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))}.*not a fastdpo reference cache.*something-else"):
        RefLogpCache.load(other)
    # a checksummed file of the right format that lacks fields (a KeyError before)
    partial = tmp_path / "partial.pt"
    save_checksummed(partial, {"format": CACHE_FORMAT, "model_hash": "m", "keys": ["a" * 32]})
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(partial))}.*lacks the field\(s\) \['data_hash', 'settings', 'values'\]"
    ):
        RefLogpCache.load(partial)
    # fields of the wrong kind
    bad_values = tmp_path / "bad_values.pt"
    save_checksummed(
        bad_values,
        {
            "format": CACHE_FORMAT,
            "model_hash": "m",
            "data_hash": "x",
            "settings": {},
            "keys": ["a" * 32, "b" * 32],
            "values": torch.zeros(3, 2),
        },
    )
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad_values))}.*'values' must be a float \[2, 2\] tensor"):
        RefLogpCache.load(bad_values)
    # a folder and a missing path
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*directory"):
        RefLogpCache.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        RefLogpCache.load(tmp_path / "missing.pt")


def test_old_unchecksummed_format_is_refused(tmp_path: Path) -> None:
    """fastdpo 0.1 wrote ``fastdpo-ref-logps-v1`` without a checksum: refused with a message to rebuild (decided:
    its values cannot be verified, and rebuilding costs one reference pass)."""
    cache = _cache()
    path = tmp_path / "old.pt"
    torch.save(
        {
            "format": "fastdpo-ref-logps-v1",
            "model_hash": cache.model_hash,
            "data_hash": cache.data_hash,
            "settings": cache.settings,
            "keys": cache.keys,
            "values": cache.values,
        },
        path,
    )
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}.*old format 'fastdpo-ref-logps-v1'.*checksum.*rebuild"
    ):
        RefLogpCache.load(path)
    # a v2 file whose checksum entry was removed is not accepted either
    stripped = tmp_path / "stripped.pt"
    torch.save(
        {
            "format": CACHE_FORMAT,
            "model_hash": "m",
            "data_hash": cache.data_hash,
            "settings": cache.settings,
            "keys": cache.keys,
            "values": cache.values,
        },
        stripped,
    )
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(stripped))}.*no checksum"):
        RefLogpCache.load(stripped)


def test_intact_cache_round_trips(tmp_path: Path) -> None:
    cache = _cache()
    path = tmp_path / "ref.pt"
    cache.save(path)
    loaded = RefLogpCache.load(path, model_hash="m", data_hash=cache.data_hash, settings=cache.settings)
    assert loaded.keys == cache.keys and torch.equal(loaded.values, cache.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]
