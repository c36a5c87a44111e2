"""The ``fastdpo`` command: ``fastdpo bench | memory | train``.

Each subcommand lives in its own module and exposes ``main(argv: list[str] | None) -> int``. Usage errors of every
subcommand are one line on stderr and exit code 2, never a traceback: parsers are :class:`ArgParser` (argparse that
prints only its error line), argument values go through the checking ``type=`` functions below (which name the
argument in argparse's ``argument --x: ...`` message), and later checks raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_COMMANDS = {
    "bench": ("fastdpo.benchmarks.driver", "benchmark fastdpo against naive PyTorch and the peers"),
    "memory": ("fastdpo.memory_cli", "estimate (and --measure) the memory of a DPO step"),
    "train": ("fastdpo.train", "train a causal LM with DPO on a local preference file"),
}


class UsageError(SystemExit):
    """A bad command line or input file: reported as ``<prog>: <message>`` on one line, exit code 2. A
    ``SystemExit`` (code 2) whose ``str`` is the message, so a command may also let it end the process after printing
    it (``fastdpo bench`` does)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArgParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``<prog>: error: <message>``, no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def parse(self, argv: list[str] | None) -> argparse.Namespace | int:
        """``parse_args(argv)``, or the exit code when argparse exits (``-h``: 0, a bad argument: 2)."""
        try:
            return self.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (``""`` for an empty one), for a one-line error that quotes it."""
    return next(iter(str(exc).splitlines()), "")


def report(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as ``<prog>: <message>`` on one line of stderr; return 2."""
    print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse ``type=``: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def float_in(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """argparse ``type=``: a finite float in the interval ``low .. high`` (``None``: unbounded; ``*_open``: the bound
    itself excluded). NaN and infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {' and '.join(b for b in (lo, hi) if b)}, got {text}"
            )
        return value

    return parse


def one_of(*values: str) -> dict[str, Any]:
    """``add_argument`` keywords of a flag taking one of ``values``, the first one by default:
    ``parser.add_argument("--packing", **one_of("pad", "padding_free"))``."""
    return {"choices": values, "default": values[0]}


def threads(text: str) -> int:
    """argparse ``type=`` of ``--threads``: between 1 and the machine's CPU count."""
    return int_in(1, os.cpu_count() or 1)(text)


def output_dir(text: str) -> Path:
    """argparse ``type=`` of an output folder: it may not exist yet, but may not be an existing file."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("must name a folder")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def make_output_dir(flag: str, path: Path) -> None:
    """Create ``path`` (and parents) and check it is writable; :class:`UsageError` naming ``flag`` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: not writable")


def resolve_device(flag: str, name: str | None, *, allowed: tuple[str, ...] = ("cpu", "cuda")):
    """``torch.device`` of ``name`` (``None``/``"auto"``: cuda when available, else cpu), checked to exist here;
    :class:`UsageError` naming ``flag`` otherwise."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device; use {', '.join(allowed)} (or cuda:N)") from None
    if device.type not in allowed:
        raise UsageError(f"{flag} {name!r}: only {', '.join(allowed)} are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"{flag} {name}: the CPU device has no index {device.index}")
    return device


def _usage() -> str:
    lines = ["usage: fastdpo {bench,memory,train} [-h] ...", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv:
        print(f"fastdpo: missing command ({', '.join(_COMMANDS)}); see fastdpo --help", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"fastdpo: unknown command {command!r}; choose from {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
