"""Plots derived from a sweep CSV (never from live timings).

    python -m perf.plot perf/results/<gpu>/sweep.csv

For each (mode, dtype, layout): throughput (GB/s of floor bytes) vs batch size on a log2 axis, one
line per provider, one panel per shape, and a dashed line at the copy bandwidth measured in the
same run; and the speedup of gn_triton over each peer. A functional run (Triton's interpreter on a
CPU) gets one plot instead, errors.png: each provider's error against the float64 reference.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines get a non-GUI backend by themselves
import pandas as pd

from .rows import load_csv_argument

COLORS = {"gn_triton": "C3", "torch_eager": "C0", "torch_compile": "C2", "liger": "C1", "apex_nhwc": "C4"}


def _panels(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def _batch_axis(ax, title: str, ylabel: str) -> None:
    """A panel whose x axis is the batch size, on a log2 scale."""
    ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, path: Path, rect=None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_figure(df: pd.DataFrame, meta: dict, mode: str, dtype: str, layout: str, path: Path) -> Path:
    sub = df[(df["mode"] == mode) & (df["dtype"] == dtype) & (df["layout"] == layout) & (df["status"] == "ok")]
    activation = meta.get("activation", "none")
    what = "GroupNorm" if activation == "none" else f"{activation}(GroupNorm)"
    shapes = list(dict.fromkeys(sub["shape"]))
    rows, cols = _panels(len(shapes))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        part = sub[sub["shape"] == shape]
        for provider, line in part.groupby("provider"):
            line = line.sort_values("N")
            ax.plot(line["N"], line["gbps"], marker="o", ms=3, label=provider, color=COLORS.get(provider))
        ax.axhline(meta["copy_gbps"], ls="--", color="gray", lw=1, label="copy bandwidth")
        _batch_axis(ax, f"{part['suite'].iloc[0]}: {shape}", "GB/s (floor bytes)")
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    kind = " (FUNCTIONAL CPU RUN, not performance)" if meta["run_kind"] != "gpu-performance" else ""
    fig.suptitle(f"{what} {mode} {dtype} {layout} on {meta['device']}{kind}", fontsize=11)
    return _save(fig, path, rect=(0, 0.06, 1, 0.95))


def speedup_figure(df: pd.DataFrame, meta: dict, path: Path) -> Path | None:
    ok = df[df["status"] == "ok"]
    keys = ["mode", "dtype", "layout", "shape", "N"]
    ours = ok[ok["provider"] == "gn_triton"].set_index(keys)["ms"]
    peers = [p for p in dict.fromkeys(ok["provider"]) if p != "gn_triton"]
    if not peers or ours.empty:
        return None
    fig, axes = plt.subplots(1, len(peers), figsize=(5 * len(peers), 3.6), squeeze=False)
    for ax, peer in zip(axes.flat, peers):
        ratio = (ok[ok["provider"] == peer].set_index(keys)["ms"] / ours).dropna().reset_index()
        for (mode, dtype, layout), part in ratio.groupby(["mode", "dtype", "layout"]):
            by_n = part.groupby("N")["ms"].apply(lambda r: math.exp(r.map(math.log).mean()))
            ax.plot(by_n.index, by_n.values, marker="o", ms=3, label=f"{mode} {dtype} {layout}")
        ax.axhline(1, color="gray", lw=1)
        _batch_axis(ax, f"gn_triton speedup over {peer}", "speedup (geomean over shapes)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(df: pd.DataFrame, meta: dict, out: Path) -> list[Path]:
    paths = []
    for (mode, dtype, layout), _ in df[df["status"] == "ok"].groupby(["mode", "dtype", "layout"]):
        act = "" if meta.get("activation", "none") == "none" else f"_{meta['activation']}"
        name = f"throughput{act}_{mode.replace('+', '_')}_{dtype}_{layout}.png"
        paths.append(throughput_figure(df, meta, mode, dtype, layout, out / name))
    speedup = speedup_figure(df, meta, out / "speedup.png")
    return paths + ([speedup] if speedup else [])


def error_figure(df: pd.DataFrame, meta: dict, path: Path) -> Path:
    """A functional run's plot: each provider's error against the float64 reference at every point it
    ran, per dtype (the interpreter's timings are no throughput, so no timing is drawn), with the pass
    line (perf.measure's bound: above it a result counts as wrong) and a key naming each point's case."""
    from .measure import CHECK_TOL, DTYPES  # the bound the sweep itself applied

    checked = df[df["check_error"].notna()].reset_index(drop=True)
    dtypes = list(dict.fromkeys(checked["dtype"]))
    keys = lambda rows: list(zip(rows["shape"], rows["N"], rows["mode"], rows["layout"]))  # noqa: E731
    points = {key: k for k, key in enumerate(dict.fromkeys(keys(checked)))}  # one numbering for every panel
    fig = plt.figure(figsize=(5.5 * max(1, len(dtypes)), 3.6 + 0.16 * math.ceil(len(points) / 3)))
    grid = fig.add_gridspec(2, max(1, len(dtypes)), height_ratios=(3.6, 0.16 * math.ceil(len(points) / 3)))
    for i, dtype in enumerate(dtypes):
        ax = fig.add_subplot(grid[0, i])
        part = checked[checked["dtype"] == dtype]
        for provider, rows in part.groupby("provider"):
            x = [points[key] for key in keys(rows)]
            ax.scatter(x, rows["check_error"].clip(lower=1e-17), s=12, label=provider, color=COLORS.get(provider))
        if dtype in DTYPES:
            bound = CHECK_TOL[DTYPES[dtype]]
            ax.axhline(bound, color="k", linestyle="--", linewidth=1, label=f"pass line {bound:g}")
        ax.set_yscale("log")
        ax.set_title(dtype, fontsize=10)
        ax.set_xlabel("point (numbered in the key below)")
        ax.set_ylabel("max error / max |float64 reference|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    labels = [f"{k}: {shape}, N={n}, {mode}, {layout}" for (shape, n, mode, layout), k in points.items()]
    rows = math.ceil(len(labels) / 3)
    for column in range(3):
        key.text(column / 3, 1, "\n".join(labels[column * rows : (column + 1) * rows]), fontsize=7, va="top",
                 family="monospace", transform=key.transAxes)  # fmt: skip
    fig.suptitle(f"FUNCTIONAL CHECK in Triton's interpreter on {meta['device']}: error against the float64 "
                 "reference (not performance)", fontsize=10)  # fmt: skip
    return _save(fig, path, rect=(0, 0, 1, 0.95))


def main(argv=None) -> int:
    folder, meta, df = load_csv_argument("python -m perf.plot", __doc__, argv)
    functional = meta.get("run_kind") != "gpu-performance"
    for path in [error_figure(df, meta, folder / "errors.png")] if functional else plot_all(df, meta, folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
