"""Fetch the wheels the one-shot GPU run installs offline (issue #20 item 1), on a machine with registry access.

    python benchmarks/wheels.py [--dest .whl] [--python-version 3.12]

The GPU machine (KINDS.md, ``nvidia-h200``: Python 3.12, torch 2.11, Triton 3.6, transformers, peft, accelerate,
pyarrow, pandas, ... preinstalled; no network) lacks the peers. This downloads, for CPython ``--python-version`` on
manylinux x86-64, without dependencies (``pip download --no-deps --only-binary=:all:``), exactly :data:`PINS`, drops
any other version of those projects from the folder (two versions of one project stop the whole install there),
then checks every ``Requires-Dist`` of every wheel (extras off, markers evaluated for that Python on Linux x86-64)
against the wheels themselves plus :data:`IMAGE` — a dependency in neither would be missing on the GPU machine — and
prints the folder's size beside the working tree's (tracked + untracked-not-ignored files: what the device tool
sends), which together must stay under the 64 MiB a device call carries.

Exit status 0 when every wheel is there, no dependency is missing and the total fits; 1 otherwise; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20
PINS = {
    "trl": "1.16.0",  # the DPOTrainer / chunked head the project targets
    "liger-kernel": "0.8.5",  # needs torch>=2.1.2, triton>=2.3.1
    # the newest release (2025-01); requires torch and triton unpinned; the Triton names it imports
    # (triton.testing.get_dram_gbps/nvsmi/..., triton.language.extra.libdevice) are still in Triton 3.6-3.9
    "cut-cross-entropy": "25.1.1",
    # trl 1.16 needs datasets>=4.7 (and imports it); 4.8.5 asks pyarrow>=21 (trl's own floor) where datasets 5.x asks
    # >=24, and huggingface-hub<2 (the image has 1.33) -- the image's pyarrow version is not recorded
    "datasets": "4.8.5",
    "dill": "0.4.1",  # datasets: dill>=0.3,<0.4.2; multiprocess 0.70.19: dill>=0.4.1
    "multiprocess": "0.70.19",  # datasets: multiprocess<0.70.20 (a py312-specific wheel)
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Python distributions of the GPU image ('cuda'), as KINDS.md lists them (read on a machine on 2026-11-17).
IMAGE = frozenset(
    canonicalize_name(n)
    for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()
)


def marker_env(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def download(dest: Path, python_version: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "--dest",
        str(dest),
        "--disable-pip-version-check",
    ]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += [f"{name}=={version}" for name, version in PINS.items()]
    subprocess.run(cmd, check=True)


def prune(dest: Path) -> list[str]:
    """Delete wheels of the pinned projects at other versions, and files that are not wheels of a pinned project;
    returns what was removed."""
    removed = []
    for f in sorted(dest.iterdir()):
        try:
            name, version, _, _ = parse_wheel_filename(f.name)
            keep = str(version) == PINS.get(str(name), "")
        except Exception:  # not a wheel file name
            keep = False
        if not keep:
            f.unlink()
            removed.append(f.name)
    return removed


def requirements(wheel: Path, python_version: str) -> list[str]:
    """Distribution names the wheel requires on CPython ``python_version``, Linux x86-64, no extras."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(zf.read(meta).decode())
    env = marker_env(python_version)
    names = []
    for line in headers.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonicalize_name(req.name))
    return names


def missing_requirements(wheels: list[Path], python_version: str) -> dict[str, list[str]]:
    """``{wheel: [required names neither in the folder nor in the GPU image]}`` (empty when all is there)."""
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels} | IMAGE
    out = {}
    for w in wheels:
        lacking = sorted(set(requirements(w, python_version)) - have)
        if lacking:
            out[w.name] = lacking
    return out


def tree_bytes(repo: Path) -> int:
    """Bytes of the files the device tool sends: tracked plus untracked-not-ignored (``git ls-files``)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl", help="wheel folder (default: .whl at the repo root)")
    p.add_argument("--python-version", default="3.12", help="target CPython X.Y (default 3.12, the GPU image's)")
    args = p.parse_args(argv)
    if not args.python_version.replace(".", "").isdigit() or args.python_version.count(".") != 1:
        print(f"wheels.py: --python-version must look like 3.12, got {args.python_version!r}", file=sys.stderr)
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    try:
        download(args.dest, args.python_version)
    except subprocess.CalledProcessError as exc:
        print(f"wheels.py: pip download failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    removed = prune(args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    status = 0
    names = {str(parse_wheel_filename(w.name)[0]) for w in wheels}
    if names != set(PINS):
        print(f"wheels.py: MISSING wheels for {sorted(set(PINS) - names)}", file=sys.stderr)
        status = 1
    lacking = missing_requirements(wheels, args.python_version)
    for wheel, deps in lacking.items():
        print(f"wheels.py: {wheel} needs {deps}: neither in {args.dest} nor in the GPU image", file=sys.stderr)
        status = 1
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes(REPO)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    if removed:
        print(f"  removed: {', '.join(removed)}")
    print(
        f"wheels {wheel_bytes / 2**20:.2f} MiB in {args.dest}; working tree {tree / 2**20:.2f} MiB; together "
        f"{(wheel_bytes + tree) / 2**20:.2f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries; "
        f"dependencies {'all present' if not lacking else 'MISSING (above)'}"
    )
    if wheel_bytes + tree > CARRY_LIMIT:
        print("wheels.py: over the carry limit", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
