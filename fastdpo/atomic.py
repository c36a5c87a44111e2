"""Crash-safe, checksummed files: what ``fastdpo train`` checkpoints and the reference log-prob cache are written with.

* :func:`atomic_write` writes a temporary file next to the target, fsyncs it and ``os.replace``s it over the target
  (then fsyncs the folder): readers see the old file or the new one, never a part. The temporary file is named
  ``.<target name>.<pid>.tmp``; a writer killed mid-write (``kill -9``, power loss) leaves at most that one file,
  which the next write of the same target (or :func:`remove_stale_tmp`, which ``fastdpo train`` calls at start)
  deletes once its process is gone, so leftovers cannot accumulate. With ``previous=`` the file being replaced is kept
  as a second generation.
* :func:`save_checksummed` / :func:`load_checksummed` store a SHA-256 of the *content* (:func:`content_digest`: every
  tensor's dtype, shape and bytes, and every other value, in order) inside the ``torch.save`` dict and verify it on
  load, so a flipped bit anywhere in the payload, a truncated or an empty file is a :class:`CorruptFileError` naming the
  file, never silently used. The file stays a plain ``torch.save`` dict (``torch.load`` reads it; the digest is one
  more string entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CHECKSUM_KEY",
    "CorruptFileError",
    "atomic_dir",
    "atomic_write",
    "content_digest",
    "load_checksummed",
    "read_dict",
    "remove_stale_tmp",
    "remove_stale_tmp_in",
    "save_checksummed",
    "verify_checksum",
]

#: the entry of a checksummed ``torch.save`` dict that holds the SHA-256 (hex) of the other entries
CHECKSUM_KEY = "sha256"
_CHUNK = 1 << 26  # tensor bytes hashed per piece (64 MiB): a GPU tensor is copied to the host piece by piece


class CorruptFileError(ValueError):
    """A file fastdpo wrote that cannot be used: empty, truncated, unreadable, or not matching its checksum."""


# ----------------------------------------------------------------------------------------------- temporary files
def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmp(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files (and folders, see :func:`atomic_dir`) that dead writers of ``path`` left beside it:
    ``.<name>.<pid>.tmp`` whose process no longer runs, and ``<name>.<random>.tmp`` from fastdpo <= 0.1's
    ``mkstemp`` names. Returns what was deleted."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    ours = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.tmp$")
    legacy = re.compile(rf"^{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for entry in path.parent.iterdir():
        m = ours.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or legacy.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def remove_stale_tmp_in(directory: str | os.PathLike[str]) -> list[Path]:
    """:func:`remove_stale_tmp` for every target in ``directory``: delete each ``.<name>.<pid>.tmp`` there whose
    process no longer runs (for folders whose file names change from run to run, such as benchmark results)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(r"^\.(.+)\.(\d+)\.tmp$")
    removed = []
    for entry in directory.iterdir():
        m = pattern.match(entry.name)
        if m:
            removed += remove_stale_tmp(directory / m.group(1))
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, previous: str | os.PathLike[str] | None = None
) -> None:
    """Write ``path`` through ``write(binary file)`` atomically (temporary file in the same folder, fsync,
    ``os.replace``). With ``previous``, an existing ``path`` is first moved there (after the new content is safely on
    disk), so two generations exist. On any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name (``.<name>.<pid>.tmp``) and put it in place of ``path`` only when the
    ``with`` block finished: a crash never leaves a half-written ``path`` that looks complete. An existing ``path`` is
    replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _tmp_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------------ checksums
def _feed_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type == "meta":
        raise TypeError("cannot checksum a tensor on the meta device")
    h.update(f"T{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        h.update(flat[start : start + _CHUNK].cpu().numpy().tobytes())


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _feed_tensor(h, obj)
    elif isinstance(obj, dict):
        h.update(b"D%d|" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L%d|" if isinstance(obj, list) else b"U%d|") % len(obj))
        for value in obj:
            _feed(h, value)
    elif obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        h.update(b"I%d|" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b"|")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d|" % len(data) + data)
    elif isinstance(obj, bytes):
        h.update(b"Y%d|" % len(obj) + obj)
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"d" + str(obj).encode() + b"|")
    elif type(obj).__module__ == "numpy":  # ndarray or numpy scalar (NumPy's RNG state)
        import numpy as np

        arr = np.ascontiguousarray(obj)
        h.update(f"A{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of ``obj``: nested dicts (in insertion order), lists, tuples, tensors (dtype, shape, bytes),
    NumPy arrays and plain scalars/strings. Equal after a ``torch.save`` / ``torch.load`` round trip; any changed bit
    of a value changes it. ``TypeError`` for anything else."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_checksummed(
    path: str | os.PathLike[str], obj: dict[str, Any], *, previous: str | os.PathLike[str] | None = None
) -> None:
    """``torch.save(obj + {CHECKSUM_KEY: content_digest(obj)})`` through :func:`atomic_write`."""
    if CHECKSUM_KEY in obj:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum")
    payload = {**obj, CHECKSUM_KEY: content_digest(obj)}
    atomic_write(path, lambda f: torch.save(payload, f), previous=previous)


def read_dict(path: str | os.PathLike[str], *, what: str = "file", weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` a dict from ``path`` onto the CPU, without checking it. ``FileNotFoundError`` when missing;
    :class:`CorruptFileError` naming ``path`` (and ``what`` it should be) when it is a folder, empty, truncated,
    unreadable or not a dict."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError surfaces as itself
    if path.is_dir():
        raise CorruptFileError(f"{path} is a directory, not a {what}")
    if size == 0:
        raise CorruptFileError(f"{path} is empty: not a usable {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise CorruptFileError(
            f"{path} is not a {what}: unreadable (truncated or corrupt: {type(exc).__name__})"
        ) from exc
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} is not a {what} (it holds a {type(obj).__name__}, not a dict)")
    return obj


def verify_checksum(obj: dict[str, Any], path: str | os.PathLike[str], *, what: str = "file") -> dict[str, Any]:
    """Check ``obj`` (read from ``path``) against its :data:`CHECKSUM_KEY` entry and return it without that entry;
    :class:`CorruptFileError` naming ``path`` when the entry is missing or does not match."""
    obj = dict(obj)
    stored = obj.pop(CHECKSUM_KEY, None)
    if not isinstance(stored, str):
        raise CorruptFileError(f"{path} has no checksum, so its content cannot be verified: not a usable {what}")
    try:
        actual = content_digest(obj)
    except TypeError as exc:
        raise CorruptFileError(f"{path} is not a {what} ({exc})") from exc
    if actual != stored:
        raise CorruptFileError(
            f"{path} is corrupt: its content does not match the checksum stored when it was "
            f"written (the {what} was damaged on disk); it is not used"
        )
    return obj


def load_checksummed(path: str | os.PathLike[str], *, what: str = "file", weights_only: bool = True) -> dict[str, Any]:
    """Load a dict written by :func:`save_checksummed` (:func:`read_dict` + :func:`verify_checksum`): the content
    without the checksum entry, or ``FileNotFoundError`` / :class:`CorruptFileError` naming ``path``."""
    return verify_checksum(read_dict(path, what=what, weights_only=weights_only), path, what=what)
