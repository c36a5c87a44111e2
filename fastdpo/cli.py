"""The ``fastdpo`` command: ``fastdpo bench | memory | train``.

Each subcommand lives in its own module and exposes ``main(argv: list[str] | None) -> int``.
"""
from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "bench": ("fastdpo.benchmarks.driver", "benchmark fastdpo against naive PyTorch and the peers"),
    "memory": ("fastdpo.memory", "estimate (and --measure) the memory of a DPO step"),
    "train": ("fastdpo.train", "train a causal LM with DPO on a local preference file"),
}


def _usage() -> str:
    lines = ["usage: fastdpo {bench,memory,train} [-h] ...", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"fastdpo: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
