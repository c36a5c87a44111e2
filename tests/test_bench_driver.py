"""``fastdpo bench`` driver: a --quick run on tiny shapes writes a table, JSON, CSV and PNG that parse, with the
measured numbers consistent; the in-process measurement primitives behave (extra peak RSS tracks an allocation)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fastdpo.benchmarks import driver, impls, measure
from fastdpo.benchmarks.impls import Shape

#: peers that install and run on CPU (``.ci/run`` installs them); CCE and Liger's head need CUDA
CPU_IMPLS = {
    "head": {"naive", "fastdpo", "trl", "torch_lce"},
    "logprobs": {"naive", "fastdpo", "trl"},
    "dpo": {"naive", "fastdpo", "liger"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``fastdpo bench --quick`` with every implementation of every workload (one worker process each)."""
    out = tmp_path_factory.mktemp("bench")
    rc = driver.main(["--quick", "--device", "cpu", "--out", str(out)])
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
    # every peer that installs on CPU ran (2 tiny shapes each); GPU-only peers are reported unavailable, not run
    by_impl: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by_impl.setdefault((r["workload"], r["impl"]), []).append(r)
    assert set(by_impl) == {(w, i.name) for i in impls.IMPLS for w in [i.workload]}
    for (workload, name), recs in by_impl.items():
        assert len(recs) == 2, (workload, name)
        if name in CPU_IMPLS[workload]:
            assert all(r["status"] == "ok" for r in recs), (workload, name, [r["status"] for r in recs])
        else:
            # the GPU-only peers (CCE, Liger's Triton head) are reported unavailable, not run
            (impl,) = [i for i in impls.IMPLS if (i.workload, i.name) == (workload, name)]
            assert impl.cuda_only, (workload, name)
            assert all(r["status"] == f"unavailable: {name} needs CUDA (device is cpu)" for r in recs)
    for r in results:
        if r["status"] != "ok":
            continue
        assert r["repeats"] == 1 and r["step_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"], rel=1e-6)
        # the gradient buffers are the leaves' sizes: hidden + weight (head, dpo) or the logits (logprobs), fp32
        n, d, v = r["tokens"], r["hidden"], r["vocab"]
        leaves = n * v if r["workload"] == "logprobs" else n * d + v * d
        assert r["grad_mb"] * 2**20 == leaves * 4, r
    naive = {(r["workload"], r["vocab"]): r for r in results if r["impl"] == "naive"}
    for r in results:
        if r["status"] == "ok":  # the speed-up is over naive at the same workload and shape
            assert r["speedup_vs_naive"] == pytest.approx(naive[r["workload"], r["vocab"]]["step_ms"] / r["step_ms"])
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(results) and set(driver.CSV_FIELDS) <= set(rows[0])
    assert [(row["workload"], row["impl"], row["status"]) for row in rows] == [
        (r["workload"], r["impl"], r["status"]) for r in results
    ]
    pngs = sorted(out.glob("quick-cpu-*-vs-vocab.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert sorted(meta["plots"]) == sorted(str(p) for p in pngs)


def test_memory_columns_see_the_logits(tmp_path):
    """At ``N = 2048`` tokens and ``V = 32000`` (fp32 logits ``L`` = 250 MiB) the extra-peak columns show what each
    path must hold: naive materializes the logits and their log-softmax in forward (>= 2L) and one more [N, V] tensor
    in backward (>= 3L); the fused head never holds more than its kept tiles (``keep_logits_bytes``, 176 MiB, plus a
    few tiles); the log-prob kernel's forward builds no [N, V] tensor (naive: the log-softmax, >= L), both backwards
    allocate the logits gradient (L)."""
    n, v = 2048, 32000
    logits_mb = n * v * 4 / 2**20
    rc = driver.main(
        [
            "--device",
            "cpu",
            "--workloads",
            "head,logprobs",
            "--impls",
            "naive,fastdpo",
            "--tokens",
            str(n),
            "--hidden",
            "8",
            "--vocab",
            str(v),
            "--repeats",
            "1",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    (json_path,) = tmp_path.glob("cpu-*.json")
    rec = {(r["workload"], r["impl"]): r for r in json.loads(json_path.read_text())["results"]}
    assert all(r["status"] == "ok" for r in rec.values()), rec
    head_naive, head_fast = rec["head", "naive"], rec["head", "fastdpo"]
    assert head_naive["fwd_peak_mb"] >= 0.98 * 2 * logits_mb, head_naive
    assert head_naive["step_peak_mb"] >= 0.98 * 3 * logits_mb, head_naive
    assert head_fast["step_peak_mb"] <= 0.4 * head_naive["step_peak_mb"], (head_fast, head_naive)
    lp_naive, lp_fast = rec["logprobs", "naive"], rec["logprobs", "fastdpo"]
    assert lp_naive["fwd_peak_mb"] >= 0.98 * logits_mb and lp_naive["step_peak_mb"] >= 0.98 * 2 * logits_mb
    assert lp_fast["fwd_peak_mb"] <= 0.5 * logits_mb, lp_fast
    assert 0.98 * logits_mb <= lp_fast["step_peak_mb"] <= 1.5 * logits_mb, lp_fast
    assert lp_naive["grad_mb"] == lp_fast["grad_mb"] == logits_mb


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


def test_head_bound_reports_consistent_figures(tmp_path, one_thread, capsys):
    """``python -m fastdpo.benchmarks.head_bound``: the GEMMs are timed at the tile the fused head really uses, the kept
    fraction saturates at both ends (no budget: every logit recomputed, the bound is 2 logits GEMMs + 2 gradient
    GEMMs; a budget above the logits: 1 + 2), and what it prints is what it writes."""
    from fastdpo.benchmarks import head_bound
    from fastdpo.head.plan import _plan

    n, d, v = 96, 24, 1100
    figures = {}
    for budget_mb in (0.0, 1.0):  # the fp32 logits are 96 * 1100 * 4 B = 0.40 MiB
        out = tmp_path / f"bound-{budget_mb}.json"
        assert (
            head_bound.main(
                [
                    "--tokens",
                    str(n),
                    "--hidden",
                    str(d),
                    "--vocab",
                    str(v),
                    "--budget-mb",
                    str(budget_mb),
                    "--repeats",
                    "1",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        printed = capsys.readouterr().out
        r = figures[budget_mb] = json.loads(out.read_text())
        assert r["tile"] == list(_plan(n, v, torch.device("cpu")))
        assert r["shape"] == {"tokens": n, "hidden": d, "vocab": v} and r["threads"] == 1
        assert f"keeps {100 * r['kept_fraction']:.1f}% of the logits" in printed
        assert f"= {r['bound_over_naive']:.2f}x naive" in printed
        assert f"= {r['fastdpo_over_naive']:.2f}x naive" in printed
    g0, g1 = figures[0.0]["gemm_s"], figures[1.0]["gemm_s"]
    assert figures[0.0]["kept_fraction"] == 0.0 and figures[1.0]["kept_fraction"] == 1.0
    assert figures[0.0]["bound_s"] == pytest.approx(2 * g0["logits"] + g0["grad_hidden"] + g0["grad_weight"])
    assert figures[1.0]["bound_s"] == pytest.approx(g1["logits"] + g1["grad_hidden"] + g1["grad_weight"])
