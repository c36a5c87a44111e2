"""Fetch Liger-Kernel 0.8.5's own chunked-loss tests and run them against fastdpo (see ``tests/liger_swap.py``).

The tests come from Liger's source distribution on the package registry (``pip download --no-binary :all: --no-deps
liger-kernel==0.8.5``): nothing of Liger's is copied into this repository. The sdist is downloaded once and its
``test/__init__.py``, ``test/conftest.py``, ``test/utils.py`` and ``test/chunked_loss/`` are extracted into
``$TMPDIR/fastdpo-liger-0.8.5-tests`` (a file lock keeps parallel test workers from fetching twice); later runs
reuse them.

The five preference-loss files, every parametrization (975 tests, ~45 s on one CPU thread)::

    python tests/liger_suite.py                     # extra pytest arguments pass through, e.g. -k kto -x

``tests/test_liger_suite.py`` runs the same in the CI suite, one file per test. The runs use one intra-op thread
(``OMP_NUM_THREADS=1``): the shapes are small, and threads only contend with the suite's other workers.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

LIGER_VERSION = "0.8.5"
_HERE = Path(__file__).resolve().parent
_MEMBERS = ("test/__init__.py", "test/conftest.py", "test/utils.py", "test/chunked_loss/")


class FetchError(RuntimeError):
    """The sdist could not be downloaded or unpacked (no network, registry down, ...)."""


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"fastdpo-liger-{LIGER_VERSION}-tests"


def fetch_tests(root: Path | None = None, timeout: float = 300.0) -> Path:
    """The folder holding Liger's ``test/`` package (downloaded and extracted on first use); :class:`FetchError`
    when the registry cannot be reached."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    done = root / ".complete"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return root
        download = root / "sdist"
        shutil.rmtree(download, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            f"liger-kernel=={LIGER_VERSION}",
            "-d",
            str(download),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download liger-kernel=={LIGER_VERSION} timed out after {timeout:.0f}s") from None
        archives = sorted(download.glob("liger_kernel-*.tar.gz")) if download.is_dir() else []
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise FetchError(f"pip download liger-kernel=={LIGER_VERSION} (sdist) failed: {tail[0]}")
        prefix = archives[0].name[: -len(".tar.gz")] + "/"
        try:
            with tarfile.open(archives[0]) as tar:
                for member in tar.getmembers():
                    name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
                    if member.isfile() and any(name == m or (m.endswith("/") and name.startswith(m)) for m in _MEMBERS):
                        member.name = name
                        tar.extract(member, root, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise FetchError(f"cannot unpack {archives[0].name}: {exc}") from None
        if not (root / "test" / "chunked_loss" / "test_dpo_loss.py").is_file():
            raise FetchError(f"{archives[0].name} holds no test/chunked_loss/test_dpo_loss.py")
        (root / "pytest.ini").write_text("[pytest]\npython_files = test_*.py\n")
        shutil.rmtree(download, ignore_errors=True)
        done.write_text(LIGER_VERSION)
    return root


@dataclass
class SuiteResult:
    """Outcome of one run: test ids by outcome, the run's exit code and its output tail."""

    returncode: int
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    output: str = ""

    def count(self, outcome: str) -> int:
        return len(self.outcomes.get(outcome, []))


def _env(root: Path) -> dict[str, str]:
    """The environment of the Liger run: ``tests/`` (the plugin) and Liger's test root importable, nothing of an
    enclosing pytest run (xdist worker ids, addopts) inherited."""
    paths = [str(_HERE), str(root), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    return env


def _pytest_command(root: Path, files: Iterable[str], options: list[str], extra: list[str]) -> list[str]:
    """``python -m pytest`` with the ``liger_swap`` plugin, quiet, ``options``, in the fetched tree's configuration,
    over its ``test/chunked_loss/<files>``, then ``extra`` arguments."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "liger_swap",
        "-p",
        "no:cacheprovider",
        "-q",
        *options,
        "--rootdir",
        str(root),
        "-c",
        str(root / "pytest.ini"),
        *[str(root / "test" / "chunked_loss" / f) for f in files],
        *extra,
    ]


def run_suite(root: Path, files: list[str], extra: list[str] | None = None, timeout: float = 7200.0) -> SuiteResult:
    """Run Liger's ``test/chunked_loss/<files>`` with the ``liger_swap`` plugin in a fresh process; outcomes from
    its JUnit XML (``passed``, ``failed``, ``error``, ``skipped``, ``xfailed``, ``xpassed``)."""
    report = root / f"junit-{os.getpid()}-{abs(hash(tuple(files) + tuple(extra or ())))}.xml"
    env = _env(root)
    cmd = _pytest_command(root, files, ["-rfE", "-o", "junit_family=xunit1", f"--junitxml={report}"], extra or [])
    proc = subprocess.run(cmd, cwd=str(root), env=env, capture_output=True, text=True, timeout=timeout, check=False)
    result = SuiteResult(proc.returncode, output=(proc.stdout + proc.stderr)[-6000:])
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            skipped = case.find("skipped")
            if "failure" in kinds:
                outcome = "failed"
            elif "error" in kinds:
                outcome = "error"
            elif skipped is not None:
                outcome = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            else:
                outcome = "passed"
            result.outcomes.setdefault(outcome, []).append(test_id)
        report.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    from liger_swap import TEST_FILES

    try:
        root = fetch_tests()
    except FetchError as exc:
        print(f"liger_suite: {exc}", file=sys.stderr)
        return 2
    env = _env(root)
    cmd = _pytest_command(root, TEST_FILES, ["-rfEx"], argv if argv is not None else sys.argv[1:])
    return subprocess.run(cmd, cwd=str(root), env=env, check=False).returncode


if __name__ == "__main__":
    sys.path.insert(0, str(_HERE))
    raise SystemExit(main())
