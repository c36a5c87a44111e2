"""The one-shot GPU benchmark (``benchmarks/gpu_run.sh``), checked on the CPU through its ``--dry-run``.

The dry run goes through the shell script as the GPU machine would: the offline install into a temporary site
folder (here with an empty wheel folder, and Liger hidden behind a package that fails to import, so a missing peer
must be reported and skipped), then every section on tiny shapes with the Triton interpreter. The outputs must all
exist and parse, and the correctness column must pass. Plus: the time guard, the install fallback, the wheel
dependency check, the Liger head implementation the GPU run compares against, the targets summary, CLI errors.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastdpo.benchmarks import gpu_install, gpu_report, impls, wheels

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "gpu_run.sh"
HIDDEN = "liger-kernel hidden by the test"


def _outputs(out: Path, png: bool = True) -> dict[str, Path]:
    files = {p.suffix[1:]: p for p in out.iterdir()}
    assert set(files) == {"json", "csv", "txt"} | ({"png"} if png else set()), sorted(out.iterdir())
    assert len({p.stem for p in files.values()}) == 1  # one stem: <device>-<stamp>
    return files


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_run")
    hide = tmp / "hide" / "liger_kernel"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text(f"raise ImportError({HIDDEN!r})\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(tmp / "hide"), TMPDIR=str(tmp))
    proc = subprocess.run(
        ["bash", str(RUN), str(tmp / "out"), "--dry-run", "--wheels", str(tmp / "no-wheels")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _outputs(tmp / "out")
    return proc, files, json.loads(files["json"].read_text())


def test_dry_run_writes_every_output(dry_run):
    proc, files, data = dry_run
    meta, records = data["meta"], data["records"]
    assert files["json"].stem.startswith("dryrun-cpu-")
    assert meta["dry_run"] is True and meta["finished"] and meta["versions"]["torch"] == torch.__version__
    assert [s["section"] for s in meta["sections_done"]] == ["logprobs", "head", "dpo"]
    assert meta["plan"]["total_estimate_s"] > 0 and meta["env"]["TRITON_INTERPRET"] == "1"
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == len(records) and set(gpu_report.CSV_FIELDS) == set(rows[0])
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and meta["plot"] == str(files["png"])
    text = files["txt"].read_text()
    for section in ("logprobs", "head", "dpo"):
        assert f"== {section}:" in text
    assert text in proc.stdout  # gpu_run.sh prints the table last
    # the CSV / text / PNG are a pure function of the JSON: redrawing them gives the same text
    before = files["txt"].read_text()
    gpu_report.render(files["json"])
    assert files["txt"].read_text() == before


def test_dry_run_results_and_correctness_column(dry_run):
    _, _, data = dry_run
    records = data["records"]
    ran = [r for r in records if r["status"] == "ok"]
    assert not [r for r in records if r["status"].startswith(("error", "oom"))]

    lp = [r for r in ran if r["section"] == "logprobs"]
    assert len(lp) == 4 and {r["dtype"] for r in lp} == {"bfloat16", "float32"}
    for r in lp:
        assert r["impl_label"] == "fastdpo[triton]"
        assert r["fwd_gbps"] == pytest.approx(r["fwd_bytes"] / r["fwd_ms"] / 1e6)
        assert r["bwd_bytes"] == 2 * r["N"] * r["V"] * (2 if r["dtype"] == "bfloat16" else 4) + 8 * r["N"]
    head = {(r["V"], r["impl"]) for r in ran if r["section"] == "head"}
    assert {(v, i) for v in (300, 1000) for i in ("torch.mm", "naive", "fastdpo", "trl")} <= head
    dpo = {r["impl"]: r for r in ran if r["section"] == "dpo" and r["attn"] == "sdpa"}
    assert {"setup", "prefix_shared", "padding_free", "trl"} <= set(dpo)
    assert dpo["trl"]["gradient_checkpointing"] is False
    losses = [dpo[k]["loss"] for k in ("prefix_shared", "padding_free", "trl")]
    assert max(losses) - min(losses) < 1e-3  # same data, same weights, same loss
    assert dpo["prefix_shared"]["fed_tokens"] < dpo["padding_free"]["fed_tokens"]  # the prompt computed once

    checked = [r for r in ran if "accuracy" in r]
    assert len(checked) == 4 + 2 * 3 + 3
    for r in checked:
        assert r["check"] == "pass", r
        for a in r["accuracy"]:
            assert a["pass"] and 0 <= a["err"] <= a["naive_err"] + a["tol"]


def test_missing_peer_is_reported_as_skipped(dry_run):
    proc, files, data = dry_run
    meta, records = data["meta"], data["records"]
    assert meta["peers"]["liger-kernel"] == f"missing: ImportError: {HIDDEN}"
    assert f"peer liger-kernel: missing: ImportError: {HIDDEN}  -> its cases are SKIPPED" in proc.stdout
    liger = [r for r in records if r["impl"] == "liger"]
    assert len(liger) == 2
    assert all(r["status"] == f"skipped: peer liger-kernel missing: ImportError: {HIDDEN}" for r in liger)
    assert all(r["status"].startswith("skipped: ") for r in records if r["impl"] == "cce")
    assert "skipped: peer liger-kernel missing" in files["txt"].read_text()


def test_dry_run_installed_fastdpo_outside_the_checkout(dry_run):
    proc, _, data = dry_run
    install = data["meta"]["install"]
    assert install["wheels"] == {"folder": install["wheels"]["folder"], "installed": [], "failed": {}}
    assert install["fastdpo"]["method"] in ("pip", "copy")
    assert "wheels: none in" in proc.stdout and f"fastdpo: {install['fastdpo']['method']} install OK" in proc.stdout
    location = data["meta"]["versions"]["fastdpo"]
    assert "fastdpo-gpu-run." in location and str(REPO) not in location


def test_time_guard_skips_cases_and_still_writes(tmp_path):
    """A budget below the reserve: every case is recorded as skipped, the outputs are still complete."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdpo.benchmarks.gpu_bench",
            str(tmp_path / "out"),
            "--dry-run",
            "--budget-s",
            "1",
            "--sections",
            "logprobs",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = _outputs(tmp_path / "out", png=False)  # nothing ran: nothing to plot
    data = json.loads(files["json"].read_text())
    assert data["meta"]["plot"] == "no results to plot" and data["meta"]["finished"]
    records = data["records"]
    assert len(records) == 4 and all(r["status"].startswith("skipped: time budget") for r in records)
    assert "skipped: time budget" in files["txt"].read_text()


def test_install_falls_back_to_the_declared_layout(tmp_path):
    report = gpu_install.install_fastdpo(REPO, tmp_path / "site", methods=("copy",))
    assert report["method"] == "copy" and report["attempts"]["copy"].startswith("ok: imported from")
    site = tmp_path / "site" / "fastdpo"
    for rel in ("kernels/logprobs.py", "benchmarks/gpu_bench.py", "integrations/trl.py", "__init__.py"):
        assert (site / rel).is_file(), rel
    assert list((site / "data").glob("*.jsonl"))  # package data
    assert not (tmp_path / "site" / "kernels").exists()  # never a top-level `kernels`


def _fake_wheel(path: Path, name: str, requires: list[str]) -> Path:
    wheel = path / f"{name}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}\n".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return wheel


def test_wheel_dependency_check(tmp_path):
    a = _fake_wheel(
        tmp_path,
        "fakepeer",
        [
            "dill>=0.3",
            "numpy",
            "not-in-the-image (>=1)",
            "fakeother",
            'pytest-nothere; extra == "test"',
            'old-backport; python_version < "3.10"',
        ],
    )
    b = _fake_wheel(tmp_path, "fakeother", ["torch", "Also_Missing"])
    assert wheels.requirements(a, "3.12") == ["dill", "numpy", "not-in-the-image", "fakeother"]
    assert wheels.missing_requirements([a, b], "3.12") == {
        a.name: ["dill", "not-in-the-image"],
        b.name: ["also-missing"],
    }
    assert wheels.missing_requirements([a], "3.9")[a.name] == ["dill", "fakeother", "not-in-the-image", "old-backport"]


def test_liger_head_impl_gives_logprobs_and_their_gradient():
    """The Liger row of the GPU head comparison: -loss of LigerFusedLinearCrossEntropyLoss(reduction="none"), under a
    per-token upstream gradient (run here through the Triton interpreter), against float64."""
    pytest.importorskip("liger_kernel")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on CPU")
    p = impls.make_problem("head", impls.Shape(24, 16, 300), torch.float32, torch.device("cpu"), seed=3)
    x = p.inputs
    out = impls.get_impl("head", "liger").build(p, torch.device("cpu"))()
    grads = torch.autograd.grad(out, (x["hidden"], x["weight"]), p.upstream)
    h64, w64 = x["hidden"].detach().double().requires_grad_(), x["weight"].detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, x["labels"][:, None])[:, 0]
    ref_grads = torch.autograd.grad(ref, (h64, w64), p.upstream.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5)


def test_targets_summary():
    recs = [
        {
            "section": "logprobs",
            "status": "ok",
            "dtype": "bfloat16",
            "N": 4096,
            "V": 32000,
            "fwd_pct_copy": 90.0,
            "bwd_pct_copy": 80.0,
        },
        {"section": "head", "status": "ok", "V": 128256, "impl": "fastdpo", "tflops": 640.0, "pct_mm": 82.0},
        {"section": "head", "status": "ok", "V": 128256, "impl": "trl", "tflops": 400.0},
        {
            "section": "dpo",
            "status": "ok",
            "attn": "sdpa",
            "impl": "prefix_shared",
            "tokens_per_s": 30000.0,
            "peak_mb": 20000.0,
        },
        {"section": "dpo", "status": "ok", "attn": "sdpa", "impl": "trl", "tokens_per_s": 15000.0, "peak_mb": 30000.0},
        {"section": "dpo", "status": "skipped: peer trl missing", "attn": "sdpa", "impl": "padding_free"},
    ]
    lines = gpu_report.targets(recs)
    assert lines[0].endswith("target >= 85: met") and lines[1].endswith("target >= 85: NOT met")
    assert "82.0 % of torch.mm (target >= 80: met); 1.60x TRL's chunked head (target >= 1.3: met)" in lines[2]
    assert (
        lines[3] == "DPO step sdpa prefix_shared: 2.00x TRL tokens/s at 0.67x TRL's peak memory "
        "(target >= 1.5x at <= 1x: met)"
    )
    assert len(lines) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "usage: benchmarks/gpu_run.sh OUTDIR"),
        (["OUT", "--budget-s", "soon"], "--budget-s must be a whole number of seconds"),
        (["OUT", "--frobnicate"], "unknown argument --frobnicate"),
    ],
)
def test_gpu_run_cli_errors(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    proc = subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_bench_cli_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdpo.benchmarks.gpu_bench", str(tmp_path), "--sections", "heads"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown section" in proc.stderr
