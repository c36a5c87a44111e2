"""Outputs of the one-shot GPU run, rewritten after every case so that a crash or a timeout keeps every finished
result: ``<stem>.json`` (meta + records), ``<stem>.csv`` (one row per record), ``<stem>.txt`` (the tables) and
``<stem>.png`` (the plots, redrawn after each section), in OUTDIR; ``stem = <device slug>-<YYYYMMDD-HHMMSS>``
(e.g. ``h200-20261201-101500``). Each file is written to a temporary name and renamed over the old one, so a kill
mid-write leaves the previous complete version.

``python -m fastdpo.benchmarks.gpu_report RESULT.json`` redraws the CSV, text and PNG from a JSON (gpu_run.sh does
it after the benchmark process ends, however it ended).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CSV_FIELDS = [
    "section",
    "attn",
    "impl",
    "impl_label",
    "dtype",
    "N",
    "T",
    "D",
    "V",
    "pairs",
    "tokens",
    "status",
    "fwd_ms",
    "bwd_ms",
    "step_ms",
    "repeats",
    "fwd_gbps",
    "fwd_pct_copy",
    "bwd_gbps",
    "bwd_pct_copy",
    "copy_gbps",
    "tflops",
    "pct_mm",
    "mm_tflops",
    "tokens_per_s",
    "pairs_per_s",
    "fed_tokens",
    "peak_mb",
    "extra_mb",
    "loss",
    "check",
    "errors",
    "wall_s",
    "estimate_s",
]


def slug(device_name: str) -> str:
    """File-name form of a device name: ``"NVIDIA H200"`` -> ``"h200"``, ``"NVIDIA H100 80GB HBM3"`` ->
    ``"h100-80gb-hbm3"`` (letters, digits and '-' only)."""
    s = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "device"


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class Report:
    """The run's records and metadata, mirrored to disk on every change."""

    def __init__(self, outdir: Path, stem: str, meta: dict[str, Any]) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        self.paths = {ext: outdir / f"{stem}.{ext}" for ext in ("json", "csv", "txt", "png")}
        self.meta = meta
        self.records: list[dict[str, Any]] = []
        self.write()

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        """JSON, CSV and text table (cheap: after every record)."""
        write_data(self.paths, self.meta, self.records)

    def plot(self) -> None:
        """The PNG (after each section); a plotting failure is recorded in the metadata, never raised."""
        self.meta["plot"] = draw(self.records, self.meta, self.paths["png"])
        self.write()


def write_data(paths: dict[str, Path], meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    _atomic_write(paths["json"], json.dumps({"meta": meta, "records": records}, indent=1, default=str))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})
    _atomic_write(paths["csv"], buf.getvalue())
    try:
        text = text_tables(meta, records)
    except Exception as exc:  # the JSON and CSV above hold every number; a formatting bug must not stop the run
        text = f"text tables failed: {type(exc).__name__}: {exc}\n"
    _atomic_write(paths["txt"], text)


def _csv_value(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


# ------------------------------------------------------------------------------------------------------------ tables
Column = tuple[str, str, Callable[[Any], str]]


def _f(fmt: str) -> Callable[[Any], str]:
    return lambda v: "" if not isinstance(v, (int, float)) else format(v, fmt)


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _plain(*keys: str) -> list[Column]:
    """Columns shown as they are, each headed by its record key."""
    return [(k, k, _s) for k in keys]


def _pass_columns(name: str, ms_fmt: str) -> list[Column]:
    """A log-prob pass's (``fwd`` / ``bwd``) time, bandwidth and share of the copy bandwidth."""
    return [
        (f"{name} ms", f"{name}_ms", _f(ms_fmt)),
        (f"{name} GB/s", f"{name}_gbps", _f(".0f")),
        (f"{name} %copy", f"{name}_pct_copy", _f(".1f")),
    ]


EXTRA_MB: Column = ("extra MB", "extra_mb", _f(".0f"))
CHECK: Column = ("check", "check", _s)

TABLES: dict[str, tuple[str, list[Column]]] = {
    "logprobs": (
        "log-probs from logits (fastdpo.sequence_logprobs), forward and backward; GB/s of the bytes each pass "
        "must move, % of a torch clone of the same logits",
        [
            *_plain("dtype", "N", "V"),
            *_pass_columns("fwd", ".3f"),
            *_pass_columns("bwd", ".3f"),
            ("copy GB/s", "copy_gbps", _f(".0f")),
            EXTRA_MB,
            CHECK,
        ],
    ),
    "head": (
        "fused LM head, bf16, forward + backward; TFLOP/s of 6*N*D*V, % of torch.mm on the same 3 GEMMs",
        [
            *_plain("N", "D", "V", "impl"),
            *((f"{name} ms", f"{name}_ms", _f(".2f")) for name in ("fwd", "bwd", "step")),
            ("TFLOP/s", "tflops", _f(".0f")),
            ("% mm", "pct_mm", _f(".1f")),
            EXTRA_MB,
            CHECK,
        ],
    ),
    "dpo": (
        "one DPO step (reference fwd + policy fwd/bwd + loss), Llama-3.2-1B shape, bf16; tokens/s of the DPO "
        "tokens (prompt+chosen, prompt+rejected per pair)",
        [
            *_plain("attn", "impl"),
            ("step ms", "step_ms", _f(".1f")),
            ("tokens/s", "tokens_per_s", _f(".0f")),
            ("pairs/s", "pairs_per_s", _f(".2f")),
            ("fed tokens", "fed_tokens", _s),
            ("peak MB", "peak_mb", _f(".0f")),
            ("loss", "loss", _f(".5f")),
            CHECK,
        ],
    ),
}


# issue #20's targets: log-prob kernel >= 85% of the copy bandwidth; fused head >= 80% of the torch.mm rate and
# >= 1.3x TRL's chunked head; DPO engine >= 1.5x TRL DPOTrainer tokens/s at <= TRL's peak memory
TARGET_PCT_COPY, TARGET_PCT_MM, TARGET_VS_TRL_HEAD, TARGET_VS_TRL_STEP = 85.0, 80.0, 1.3, 1.5


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(records: list[dict[str, Any]]) -> list[str]:
    """One line per target of issue #20 that the finished records can answer."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = []
    lp = [r for r in ok if r.get("section") == "logprobs"]
    for key, name in (("fwd_pct_copy", "forward"), ("bwd_pct_copy", "backward")):
        if lp:
            worst = min(lp, key=lambda r: r[key])
            out.append(
                f"log-probs {name}: {worst[key]:.1f}-{max(r[key] for r in lp):.1f} % of copy bandwidth "
                f"(worst {worst['dtype']} N={worst['N']} V={worst['V']}); target >= {TARGET_PCT_COPY:g}: "
                f"{_met(worst[key] >= TARGET_PCT_COPY)}"
            )
    head = [r for r in ok if r.get("section") == "head"]
    for v in sorted({r["V"] for r in head}):
        by = {r["impl"]: r for r in head if r["V"] == v}
        if "fastdpo" in by and "pct_mm" in by["fastdpo"]:
            f = by["fastdpo"]
            line = (
                f"fused head V={v}: {f['tflops']:.0f} TFLOP/s = {f['pct_mm']:.1f} % of torch.mm "
                f"(target >= {TARGET_PCT_MM:g}: {_met(f['pct_mm'] >= TARGET_PCT_MM)})"
            )
            if "trl" in by:
                ratio = f["tflops"] / by["trl"]["tflops"]
                line += (
                    f"; {ratio:.2f}x TRL's chunked head (target >= {TARGET_VS_TRL_HEAD:g}: "
                    f"{_met(ratio >= TARGET_VS_TRL_HEAD)})"
                )
            out.append(line)
    dpo = [r for r in ok if r.get("section") == "dpo" and r.get("tokens_per_s")]
    for attn in dict.fromkeys(r["attn"] for r in dpo):
        by = {r["impl"]: r for r in dpo if r["attn"] == attn}
        trl = by.get("trl")
        for name in ("prefix_shared", "padding_free"):
            if name in by and trl is not None:
                speed = by[name]["tokens_per_s"] / trl["tokens_per_s"]
                line = f"DPO step {attn} {name}: {speed:.2f}x TRL tokens/s"
                if by[name].get("peak_mb") and trl.get("peak_mb"):
                    mem = by[name]["peak_mb"] / trl["peak_mb"]
                    line += f" at {mem:.2f}x TRL's peak memory"
                    line += (
                        f" (target >= {TARGET_VS_TRL_STEP:g}x at <= 1x: "
                        f"{_met(speed >= TARGET_VS_TRL_STEP and mem <= 1.0)})"
                    )
                out.append(line)
    return out


def text_tables(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Header lines (device, versions, peers, budget) and one aligned table per section; a row that did not run
    shows its status; the accuracy details follow each table."""
    dev = meta.get("device", {})
    lines = [
        f"fastdpo one-shot GPU run: {dev.get('name', '?')} ({meta.get('started', '?')}); "
        f"{'DRY RUN (CPU, Triton interpreter)' if meta.get('dry_run') else 'GPU'}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "peers: " + ", ".join(f"{k} {v}" for k, v in meta.get("peers", {}).items()),
    ]
    if meta.get("budget"):
        lines.append(f"budget: {meta['budget']}")
    for section, (title, cols) in TABLES.items():
        rows = [r for r in records if r.get("section") == section]
        if not rows:
            continue
        cells = [[c[0] for c in cols]]
        for r in rows:
            if r.get("status") == "ok":
                cells.append([c[2](r.get(c[1])) for c in cols])
            else:
                keep = {"dtype", "N", "D", "V", "impl", "attn"}
                cells.append([_s(r.get(c[1])) if c[1] in keep else "" for c in cols[:-1]] + [str(r.get("status"))])
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols) - 1)]
        lines += ["", f"== {section}: {title}"]
        for row in cells:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
        details = [f"  {_case_name(r)}: {r['errors']}" for r in rows if r.get("errors")]
        if details:
            lines += ["  errors (max |x - float64 ref|, the naive same-dtype error, tolerance):"] + details
    goals = targets(records)
    if goals:
        note = " (a dry run: CPU timings, not comparable)" if meta.get("dry_run") else ""
        lines += ["", f"== against issue #20's targets{note}"] + [f"  {g}" for g in goals]
    return "\n".join(lines) + "\n"


def _case_name(r: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={r[k]}" if k in ("N", "V") else str(r[k])
        for k in ("impl", "attn", "dtype", "N", "V")
        if r.get(k) is not None
    )


# ------------------------------------------------------------------------------------------------------------ plots
def draw(records: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> str:
    """One PNG, a panel per section that has results: log-probs % of copy bandwidth, fused-head TFLOP/s against the
    torch.mm rate, DPO step tokens/s and peak memory. Returns the path, or why nothing was drawn."""
    ok = [r for r in records if r.get("status") == "ok"]
    panels = [s for s in TABLES if any(r.get("section") == s for r in ok)]
    if not panels:
        return "no results to plot"
    try:
        _draw(ok, panels, meta, path)
    except Exception as exc:  # the run's numbers matter more than its pictures: never let a plot stop the run
        return f"not drawn: {type(exc).__name__}: {exc}"
    return str(path)


def _draw(ok: list[dict[str, Any]], panels: list[str], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False, constrained_layout=True)
    for ax, section in zip(axes[0], panels, strict=True):
        rows = [r for r in ok if r.get("section") == section]
        {"logprobs": _plot_logprobs, "head": _plot_head, "dpo": _plot_dpo}[section](ax, rows)
    fig.suptitle(f"fastdpo on {meta.get('device', {}).get('name', '?')} ({meta.get('started', '?')})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _bars(ax: Any, labels: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks(
        [i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right", fontsize=8
    )
    ax.legend(fontsize=8)


def _plot_logprobs(ax: Any, rows: list[dict[str, Any]]) -> None:
    short = {"bfloat16": "bf16", "float32": "fp32"}
    labels = [f"{short.get(r['dtype'], r['dtype'])} N={r['N']} V={r['V']}" for r in rows]
    _bars(ax, labels, {"forward": [r["fwd_pct_copy"] for r in rows], "backward": [r["bwd_pct_copy"] for r in rows]})
    ax.axhline(85, color="gray", ls="--", lw=1)
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_title("log-probs from logits")


def _plot_head(ax: Any, rows: list[dict[str, Any]]) -> None:
    vocabs = sorted({r["V"] for r in rows})
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "float64 reference"]
    series = {
        i: [next((r.get("tflops") or 0.0 for r in rows if r["impl"] == i and r["V"] == v), 0.0) for v in vocabs]
        for i in impls
    }
    _bars(ax, [f"V={v}" for v in vocabs], series)
    ax.set_ylabel("TFLOP/s (6*N*D*V counted)")
    ax.set_title("fused LM head, bf16, fwd+bwd")


def _plot_dpo(ax: Any, rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r.get("tokens_per_s")]
    labels = [f"{r['impl']} ({r['attn']})" for r in rows]
    _bars(ax, labels, {"tokens/s": [r["tokens_per_s"] for r in rows]})
    for i, r in enumerate(rows):  # peak memory written on each bar
        if r.get("peak_mb"):
            ax.annotate(f"{r['peak_mb'] / 1024:.1f} GB", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s (label: peak allocated memory)")
    ax.set_title("DPO step, Llama-3.2-1B shape")


def render(json_path: Path) -> dict[str, Path]:
    """Rewrite the CSV, text and PNG beside ``json_path`` from it; returns the paths."""
    data = json.loads(Path(json_path).read_text())
    stem = Path(json_path).with_suffix("")
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("json", "csv", "txt", "png")}
    data["meta"]["plot"] = draw(data["records"], data["meta"], paths["png"])
    write_data(paths, data["meta"], data["records"])
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastdpo.benchmarks.gpu_report RESULT.json", file=sys.stderr)
        return 2
    try:
        paths = render(Path(argv[0]))
    except (OSError, ValueError, KeyError) as exc:
        print(f"gpu_report: cannot render {argv[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(paths["txt"].read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
