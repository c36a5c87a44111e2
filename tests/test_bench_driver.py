"""``fastdpo bench`` driver: a --quick run on tiny shapes writes a table, JSON, CSV and PNG that parse, with the
measured numbers consistent; the in-process measurement primitives behave (extra peak RSS tracks an allocation)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fastdpo.benchmarks import driver, impls, measure
from fastdpo.benchmarks.impls import Shape


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = driver.main(["--quick", "--device", "cpu", "--workloads", "head", "--impls", "naive,cce",
                      "--out", str(out)])
    return rc, out


def test_quick_run_writes_parseable_outputs(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    (json_path,) = out.glob("quick-cpu-*.json")
    (csv_path,) = out.glob("quick-cpu-*.csv")
    data = json.loads(json_path.read_text())
    meta, results = data["meta"], data["results"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["versions"]["torch"] == torch.__version__ and meta["grads_included"] is True
    # 2 tiny shapes for naive (one worker process); cce is reported unavailable on CPU, not run
    naive = [r for r in results if r["impl"] == "naive"]
    assert len(naive) == 2 and all(r["status"] == "ok" for r in naive)
    assert all(r["status"].startswith("unavailable") for r in results if r["impl"] == "cce")
    for r in naive:
        assert r["step_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"], rel=1e-6)  # 1 repeat: medians add up
        assert r["step_peak_mb"] >= 0 and r["fwd_peak_mb"] >= 0  # tiny shapes: RSS counters are page-batched
        assert r["repeats"] == 1 and r["speedup_vs_naive"] == pytest.approx(1.0)
    head = {r["vocab"]: r for r in naive if r["workload"] == "head"}
    assert head[100]["grad_mb"] * 2**20 == (64 * 32 + 100 * 32) * 4  # hidden.grad + weight.grad, fp32
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(results) and set(driver.CSV_FIELDS) <= set(rows[0])
    pngs = list(out.glob("quick-cpu-*-vs-vocab.png"))
    assert len(pngs) == 1 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert sorted(meta["plots"]) == sorted(str(p) for p in pngs)


def test_unknown_names_are_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown implementation"):
        driver.main(["--quick", "--impls", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown workload"):
        driver.main(["--quick", "--workloads", "heads", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        driver.main(["--tokens", "0", "--out", str(tmp_path)])


def test_default_cpu_plan_is_bounded():
    """The CPU default sweep stays at the sizes the 10-minute budget was planned for."""
    for workload in impls.WORKLOADS:
        shapes = driver.default_shapes(workload, "cpu", quick=False)
        assert max(s.tokens * max(s.hidden, 1) * s.vocab for s in shapes) <= 2048 * 512 * 128256
        assert all(s.normalized(workload) == s for s in shapes)


def test_shapes_rows():
    assert Shape(2048, 512, 10).rows("dpo") == (8, 256)
    assert Shape(100, 8, 10).rows("dpo") == (2, 50)
    assert Shape(1000, 0, 10).rows("logprobs") == (1, 512)
    assert Shape(1000, 0, 10).normalized("logprobs") == Shape(512, 0, 10)


@pytest.mark.parametrize("workload", impls.WORKLOADS)
def test_naive_problems_match_float64(workload):
    """The naive baselines the benchmark compares against compute the right thing (float64 recomputation)."""
    shape = Shape(24, 8, 37).normalized(workload)
    p = impls.make_problem(workload, shape, torch.float32, torch.device("cpu"), seed=3)
    out = impls.get_impl(workload, "naive").build(p, torch.device("cpu"))()
    x = {k: v.detach().double() if v.is_floating_point() else v for k, v in p.inputs.items()}
    if workload == "head":
        ref = torch.log_softmax(x["hidden"] @ x["weight"].T, -1).gather(-1, x["labels"][:, None])[:, 0]
    elif workload == "logprobs":
        lab = x["labels"]
        lp = torch.log_softmax(x["logits"], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
        ref = torch.where(lab != -100, lp, 0).sum(-1)
    else:
        tgt = x["target"]

        def seq(h, w):
            lp = torch.log_softmax(h @ w.T, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
            return torch.where(tgt != -100, lp, 0).sum(-1)

        pol, ref_lp = seq(x["hidden"], x["weight"]), seq(x["ref_hidden"], x["ref_weight"])
        n = pol.shape[0] // 2
        ref = -torch.nn.functional.logsigmoid(0.1 * ((pol[:n] - ref_lp[:n]) - (pol[n:] - ref_lp[n:]))).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_peak_memory_probe_sees_an_allocation():
    """VmHWM-based extra peak: a 64 MiB tensor allocated and freed after reset shows up (>= 60 MiB) in extra()."""
    probe = measure.PeakMemory(torch.device("cpu"))
    probe.reset()
    t = torch.ones(16 * 2**20)  # 64 MiB, touched
    del t
    assert probe.extra() >= 60 * 2**20
    probe.reset()
    assert probe.extra() < 60 * 2**20


def test_unavailable_impl_reports_reason():
    reason = impls.get_impl("head", "cce").unavailable(torch.device("cpu"))
    assert reason is not None and reason.startswith("unavailable:")
    with pytest.raises(ValueError, match="choices"):
        impls.get_impl("head", "nope")


def test_head_bound_reports_consistent_figures(tmp_path, one_thread):
    """``python -m fastdpo.benchmarks.head_bound``: the lower bound is (2 - kept) logits GEMMs + the two gradient
    GEMMs, the kept fraction is the budget over the fp32 logits, and the JSON holds what was printed."""
    from fastdpo.benchmarks import head_bound

    out = tmp_path / "bound.json"
    budget_mb = 0.05
    assert head_bound.main(["--tokens", "96", "--hidden", "24", "--vocab", "1100", "--budget-mb", str(budget_mb),
                            "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["kept_fraction"] == pytest.approx(budget_mb * 2**20 / (4 * 96 * 1100))
    g = r["gemm_s"]
    assert min(g.values()) > 0 and r["naive_s"] > 0 and r["fastdpo_s"] > 0
    assert r["bound_s"] == pytest.approx(g["logits"] * (2 - r["kept_fraction"]) + g["grad_hidden"] + g["grad_weight"])
    assert r["bound_over_naive"] == pytest.approx(r["bound_s"] / r["naive_s"])
