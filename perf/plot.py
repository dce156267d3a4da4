"""Plots derived from a sweep CSV (never from live timings).

    python -m perf.plot perf/results/<gpu>/sweep.csv

For each (mode, dtype, layout): throughput (GB/s of floor bytes) vs batch size on a log2 axis, one
line per provider, one panel per shape, and a dashed line at the copy bandwidth measured in the
same run; and the speedup of gn_triton over each peer.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines get a non-GUI backend by themselves
import pandas as pd

from .rows import load_run

COLORS = {"gn_triton": "C3", "torch_eager": "C0", "torch_compile": "C2", "liger": "C1", "apex_nhwc": "C4"}


def _panels(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


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
        ax.set_xscale("log", base=2)
        ax.set_title(f"{part['suite'].iloc[0]}: {shape}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("GB/s (floor bytes)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    kind = " (FUNCTIONAL CPU RUN, not performance)" if meta["run_kind"] != "gpu-performance" else ""
    fig.suptitle(f"{what} {mode} {dtype} {layout} on {meta['device']}{kind}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        ax.set_xscale("log", base=2)
        ax.set_title(f"gn_triton speedup over {peer}", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup (geomean over shapes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(df: pd.DataFrame, meta: dict, out: Path) -> list[Path]:
    paths = []
    for (mode, dtype, layout), _ in df[df["status"] == "ok"].groupby(["mode", "dtype", "layout"]):
        act = "" if meta.get("activation", "none") == "none" else f"_{meta['activation']}"
        name = f"throughput{act}_{mode.replace('+', '_')}_{dtype}_{layout}.png"
        paths.append(throughput_figure(df, meta, mode, dtype, layout, out / name))
    speedup = speedup_figure(df, meta, out / "speedup.png")
    return paths + ([speedup] if speedup else [])


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0]).parent
    meta, frames = load_run(folder)
    for path in plot_all(frames["sweep"], meta, folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
