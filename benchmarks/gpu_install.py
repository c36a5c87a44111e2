"""Offline install for the one-shot GPU run; stdlib only (it runs before fastdpo is importable).

``python3 benchmarks/gpu_install.py --repo REPO --site SITE [--wheels DIR] [--report JSON]`` puts into SITE (a folder
the caller then prepends to ``PYTHONPATH``):

1. the peers' wheels from DIR (``benchmarks/wheels.py`` fills it): ``pip install --no-index --no-deps --target SITE``
   all at once; if that fails, one wheel at a time, so a bad wheel costs its own peer only;
2. fastdpo itself, trying in order, each attempt verified by importing ``fastdpo``, ``fastdpo.kernels`` and
   ``fastdpo.benchmarks.gpu_bench`` in a fresh interpreter started outside the checkout (so the checkout's own
   ``kernels/`` never shadows anything) and checking they come from SITE:

   a. ``pip`` — ``pip install --no-index --no-deps --no-build-isolation --target SITE REPO``: a real build; needs
      setuptools and wheel in the environment (no network, no build isolation);
   b. ``copy`` — the files that build would install, laid out as pyproject.toml's ``[tool.setuptools]`` declares them
      (``packages``, ``package-dir``, ``package-data``), no build at all.

Prints one line per step and writes a JSON report (the benchmark copies it into its metadata). Exit status 0 when
fastdpo is importable from SITE (peers may be missing: the benchmark reports and skips them), 1 when it is not.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

METHODS = ("pip", "copy")
VERIFY = (
    "import fastdpo, fastdpo.kernels, fastdpo.benchmarks.gpu_bench as g; "
    "print(fastdpo.__file__); print(fastdpo.kernels.__file__); print(g.__file__)"
)


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-400:]


def install_wheels(wheels: Path | None, site: Path) -> dict:
    """Install every ``*.whl`` of ``wheels`` into ``site``; ``{"installed": [...], "failed": {wheel: why}}``."""
    found = sorted(glob.glob(str(wheels / "*.whl"))) if wheels is not None and wheels.is_dir() else []
    if not found:
        print(f"wheels: none in {wheels} -- peers come from the environment, if at all")
        return {"folder": str(wheels), "installed": [], "failed": {}}
    proc = _pip("--upgrade", "--target", str(site), *found)
    if proc.returncode == 0:
        names = [Path(w).name for w in found]
        print(f"wheels: installed {len(names)} from {wheels}: {', '.join(names)}")
        return {"folder": str(wheels), "installed": names, "failed": {}}
    print(f"wheels: installing all at once failed ({_tail(proc)}); one by one")
    report: dict = {"folder": str(wheels), "installed": [], "failed": {}}
    for w in found:
        one = _pip("--upgrade", "--target", str(site), w)
        if one.returncode == 0:
            report["installed"].append(Path(w).name)
        else:
            report["failed"][Path(w).name] = _tail(one)
            print(f"wheels: {Path(w).name} FAILED: {_tail(one)}")
    print(f"wheels: installed {len(report['installed'])}, failed {len(report['failed'])}")
    return report


def _source_dir(package: str, package_dir: dict[str, str]) -> str:
    """setuptools' rule: the longest mapped prefix of the dotted name, the rest as folders."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return os.path.join(package_dir[prefix], *parts[i:])
    return os.path.join(package_dir.get("", ""), *parts)


def copy_layout(repo: Path, site: Path) -> list[str]:
    """Copy the modules and package data pyproject.toml declares into ``site``; returns the copied paths."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir, package_data = config.get("package-dir", {}), config.get("package-data", {})
    copied = []
    for package in config["packages"]:
        src = repo / _source_dir(package, package_dir)
        dst = site.joinpath(*package.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        files = sorted(src.glob("*.py"))
        for pattern in package_data.get(package, []):
            files += sorted(src.glob(pattern))
        for f in files:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            copied.append(str(target.relative_to(site)))
    return copied


def verify(site: Path) -> tuple[bool, str]:
    """Import fastdpo from ``site`` in a fresh interpreter, outside the checkout; ``(ok, detail)``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", VERIFY], capture_output=True, text=True, cwd=cwd, env=env)
    if proc.returncode != 0:
        return False, _tail(proc)
    paths = proc.stdout.split()
    outside = [p for p in paths if not Path(p).resolve().is_relative_to(site.resolve())]
    return (not outside), ("imported from " + paths[0] if not outside else f"imported from outside {site}: {outside}")


def _tree_sha256(site: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((site / "fastdpo").rglob("*.py")):
        h.update(str(f.relative_to(site)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def install_fastdpo(repo: Path, site: Path, methods: tuple[str, ...] = METHODS) -> dict:
    """Try ``methods`` in order until fastdpo imports from ``site``; the report names the one that worked."""
    attempts = {}
    for method in methods:
        if method == "pip":
            proc = _pip("--no-build-isolation", "--target", str(site), str(repo))
            if proc.returncode != 0:
                attempts[method] = f"failed: {_tail(proc)}"
                print(f"fastdpo: pip install failed ({_tail(proc)})")
                continue
        else:
            shutil.rmtree(site / "fastdpo", ignore_errors=True)
            copy_layout(repo, site)
        ok, detail = verify(site)
        attempts[method] = ("ok: " if ok else "failed: ") + detail
        print(f"fastdpo: {method} install {'OK' if ok else 'FAILED'}: {detail}")
        if ok:
            return {"method": method, "attempts": attempts, "source_sha256": _tree_sha256(site)}
    return {"method": None, "attempts": attempts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="the checkout (holds pyproject.toml)")
    p.add_argument("--site", type=Path, required=True, help="target folder (created)")
    p.add_argument("--wheels", type=Path, default=None, help="folder of the peers' wheels")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"install methods to try, in order ({METHODS})")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or any(m not in METHODS for m in methods):
        print(f"gpu_install: --methods must be a comma list from {METHODS}, got {args.methods!r}", file=sys.stderr)
        return 2
    args.site.mkdir(parents=True, exist_ok=True)
    report = {
        "wheels": install_wheels(args.wheels, args.site),
        "fastdpo": install_fastdpo(args.repo, args.site, methods),
    }
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=1))
    return 0 if report["fastdpo"]["method"] else 1


if __name__ == "__main__":
    sys.exit(main())
