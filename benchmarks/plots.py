"""PNG plots of ``fastdpo bench`` results: step time and extra peak memory against vocabulary size and token count.

One figure per (workload, swept axis) with two panels (time, memory), one line per implementation, log axes, units in
the labels, the fixed dimensions and the device in the title.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

AXES = {"vocab": ("vocabulary size V", "V"), "tokens": ("tokens N", "N"), "hidden": ("hidden size D", "D")}
STYLE = {
    "naive": ("tab:gray", "o", "--"),
    "fastdpo": ("tab:red", "s", "-"),
    "trl": ("tab:blue", "^", "-"),
    "torch_lce": ("tab:green", "v", "-"),
    "cce": ("tab:purple", "D", "-"),
    "liger": ("tab:orange", "P", "-"),
}


def plotting_available() -> str | None:
    """``None`` when the plots can be drawn (matplotlib imports, with its non-interactive Agg backend), else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install failing in its own way
        return f"matplotlib is not usable ({type(exc).__name__}: {exc})"
    return None


def _series(records: list[dict[str, Any]], workload: str, axis: str) -> tuple[dict[str, int], dict[str, list]] | None:
    """The largest group of ok records of ``workload`` that differ only along ``axis`` (>= 2 distinct values)."""
    others = [a for a in AXES if a != axis]
    ok = [r for r in records if r["workload"] == workload and r.get("status") == "ok"]
    groups: Counter = Counter()
    values: dict[tuple, set] = {}
    for r in ok:
        key = tuple(r[a] for a in others)
        values.setdefault(key, set()).add(r[axis])
        groups[key] = len(values[key])
    best = [k for k, n in groups.most_common() if n >= 2]
    if not best:
        return None
    key = best[0]
    fixed = dict(zip(others, key))
    lines: dict[str, list] = {}
    for r in sorted(ok, key=lambda r: r[axis]):
        if tuple(r[a] for a in others) == key:
            lines.setdefault(r.get("impl_label", r["impl"]), []).append(r)
    return fixed, lines


def plot_results(records: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Draw ``<stem>-<workload>-vs-<axis>.png`` for every workload and axis with a sweep; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for workload in meta["workloads"]:
        for axis in ("vocab", "tokens", "hidden"):
            found = _series(records, workload, axis)
            if found is None:
                continue
            fixed, lines = found
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
            for label, rows in lines.items():
                color, marker, ls = STYLE.get(rows[0]["impl"], ("black", "x", "-"))
                xs = [r[axis] for r in rows]
                ax_t.plot(xs, [r["step_ms"] for r in rows], color=color, marker=marker, ls=ls, label=label)
                ax_m.plot(
                    xs, [max(r["step_peak_mb"], 1e-3) for r in rows], color=color, marker=marker, ls=ls, label=label
                )
            ticks = sorted({r[axis] for rows in lines.values() for r in rows})
            for ax in (ax_t, ax_m):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(ticks)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x)):,}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(AXES[axis][0] + " (log scale)")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            ax_t.set_ylabel("forward + backward time (ms, median)")
            ax_m.set_ylabel("extra peak memory over setup (MiB)")
            ax_t.set_title("time per step (lower is better)")
            ax_m.set_title("peak memory incl. gradient buffers (lower is better)")
            fixed_txt = ", ".join(f"{AXES[a][1]}={v}" for a, v in fixed.items() if v)
            fig.suptitle(
                f"fastdpo bench · {workload} · {fixed_txt} · {meta['dtype']} · {meta['device_name']}", fontsize=10
            )
            path = out_dir / f"{stem}-{workload}-vs-{axis}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
