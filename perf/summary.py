"""Summaries of a sweep CSV: the console table and SUMMARY.md.

Per (mode, dtype, layout, activation): geometric-mean speedup of gn_triton over each other provider (over the
shapes and batch sizes both ran), the worst-case ratio, and gn_triton's median % of the measured
copy bandwidth at batch 1 and batch 32. Targets (forward >= 80%, backward >= 70% of copy bandwidth
for tensors >= 16 MB) are checked and every miss is listed.

    python -m perf.summary perf/results/<gpu>/sweep.csv
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from gn_triton._cost import FLOOR_TRANSFERS

from .rows import load_csv_argument, load_run
from .suites import DEFAULT_SUITES, SUITES

TARGET_PCT = {"fwd": 80.0, "bwd": 70.0}
TARGET_MIN_BYTES = 16 << 20


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """The timed rows; a CSV from before the activation column counts as activation 'none'."""
    ok = df[df["status"] == "ok"]
    return ok.assign(activation=ok["activation"].fillna("none")) if "activation" in ok else ok.assign(activation="none")


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (mode, dtype, layout, peer): geomean and worst speedup of gn_triton, and gn_triton's
    median % of copy bandwidth at N=1 and N=32."""
    ok = _ok(df)
    keys = ["mode", "dtype", "layout", "activation", "shape", "N"]
    ours = ok[ok["provider"] == "gn_triton"].set_index(keys)["ms"]
    out = []
    for (mode, dtype, layout, activation), group in ok.groupby(["mode", "dtype", "layout", "activation"]):
        mine = group[group["provider"] == "gn_triton"]
        pct = {n: mine[mine["N"] == n]["pct_copy_bw"].median() for n in (1, 32)}
        for peer, peer_rows in group[group["provider"] != "gn_triton"].groupby("provider"):
            ratio = (peer_rows.set_index(keys)["ms"] / ours).dropna()
            if ratio.empty:
                continue
            out.append(dict(mode=mode, dtype=dtype, layout=layout, activation=activation, peer=peer, points=len(ratio),
                            geomean_speedup=math.exp(ratio.map(math.log).mean()), worst_speedup=ratio.min(),
                            pct_copy_bw_N1=pct[1], pct_copy_bw_N32=pct[32]))  # fmt: skip
    return pd.DataFrame(out)


def target_misses(df: pd.DataFrame) -> pd.DataFrame:
    ok = _ok(df)
    mine = ok[(ok["provider"] == "gn_triton") & ok["mode"].isin(list(TARGET_PCT))]
    big = mine[mine["floor_bytes"] / mine["mode"].map(FLOOR_TRANSFERS) >= TARGET_MIN_BYTES]  # tensor bytes
    miss = big[big["pct_copy_bw"] < big["mode"].map(TARGET_PCT)]
    return miss[["mode", "dtype", "layout", "shape", "N", "ms", "gbps", "pct_copy_bw"]]


def console_table(df: pd.DataFrame) -> str:
    table = speedups(df)
    if table.empty:
        return "no comparable measurements"
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}")


def write_summary(df: pd.DataFrame, meta: dict, path: Path) -> None:
    table = speedups(df)
    misses = target_misses(df)
    functional = meta["run_kind"] != "gpu-performance"
    lines = [
        f"# gn_triton sweep on {meta['device']}",
        "",
        f"{meta['timestamp']} · torch {meta['torch']} · triton {meta['triton']} · gn_triton {meta['gn_triton']} "
        f"(commit {meta['commit']}) · measured copy bandwidth {meta['copy_gbps']} GB/s · {meta['sm_count']} SMs",
        "",
    ]
    if functional:
        lines += [
            "**Functional run in Triton's interpreter on a CPU: these timings are not a performance result.**",
            "",
        ]
    lines += ["## Speedup of gn_triton (geometric mean over shapes and batch sizes)", ""]
    lines += [table.to_markdown(index=False, floatfmt=".2f") if not table.empty else "no comparable measurements", ""]
    if not functional:
        lines += [f"## Bandwidth targets (tensors >= {TARGET_MIN_BYTES >> 20} MB: forward >= 80%, backward >= 70%)", ""]
        lines += [
            misses.to_markdown(index=False, floatfmt=".1f") if len(misses) else "All measured points meet them.",
            "",
        ]
    skipped = df[df["status"] != "ok"]["status"].value_counts()
    if len(skipped):
        lines += ["## Not timed", ""] + [f"- {n} × {status}" for status, n in skipped.items()] + [""]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def model_predictions(device: str = "h100", batches=(1, 8, 32)) -> pd.DataFrame:
    """What gn_triton's cost model predicts for the default suites in bf16 (a model, never a
    measurement): the heuristic plan's kind, launches, HBM bytes over the floor, time and % of the
    device's copy bandwidth."""
    import torch

    from gn_triton import _cost, _tuning

    model = _cost.DEVICES[device]
    rows = []
    for shape in (s for suite in DEFAULT_SUITES for s in SUITES[suite]):
        for N in batches:
            for layout in ("contiguous", "channels_last"):
                for mode in ("fwd", "bwd"):
                    p = _tuning.Problem(N=N, C=shape.C, S=math.prod(shape.spatial), G=shape.G, dtype=torch.bfloat16,
                                        channels_last=layout == "channels_last", has_weight=True,
                                        has_bias=True)  # fmt: skip
                    plan, pred = _tuning.ranked_plans(mode, p, model)[0]
                    kind = "fused" if plan.split == 1 else f"split, {pred.waves} wave(s)"
                    rows.append(dict(shape=shape.label, N=N, layout=layout, mode=mode, plan=kind,
                                     launches=pred.launches, traffic_over_floor=pred.traffic_over_floor,
                                     predicted_us=pred.time_us,
                                     predicted_pct_copy_bw=pred.pct_copy_bw(model)))  # fmt: skip
    return pd.DataFrame(rows)


def functional_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Per provider and dtype: results checked, correct (within perf.measure's sanity bound of the
    float64 reference), incorrect, not run, and the largest error (max error / max |reference|)."""
    rows = []
    for (provider, dtype), part in df.groupby(["provider", "dtype"], sort=False):
        status = part["status"].astype(str)
        rows.append(dict(provider=provider, dtype=dtype, checked=int((~status.str.startswith("skipped")).sum()),
                         correct=int((status == "ok").sum()), incorrect=int(status.str.startswith("wrong").sum()),
                         errors=int(status.str.startswith("error").sum()),
                         max_error=part["check_error"].max()))  # fmt: skip
    return pd.DataFrame(rows)


def write_functional_summary(df: pd.DataFrame, meta: dict, path: Path) -> str:
    """SUMMARY.md of a functional run (no GPU). Returns its short part, for the console."""
    results = Path(__file__).parent / "results"
    committed = sorted(results.glob("*/SUMMARY.md"))
    counts = functional_counts(df)
    wrong = int(counts["incorrect"].sum() + counts["errors"].sum())
    short = [
        f"# gn_triton functional check on {meta['device']}",
        "",
        f"**Result: {int(counts['correct'].sum())} of {int(counts['checked'].sum())} results correct, "
        f"{wrong} wrong or failed** (per provider and dtype below; the model's predictions come after).",
        "",
        "**No GPU here.** Triton's interpreter ran gn_triton's kernels on tiny shapes and every result was",
        "checked against the float64 reference (torch eager beside it); interpreter timings say nothing about",
        "GPU speed and are not reported as throughput.",
        "",
        "## Correct results against the float64 reference, per dtype (error: max error / max |reference|)",
        "",
        counts.to_markdown(index=False, floatfmt=".2g"),
    ]
    lines = short + [
        "",
        "## GPU results committed under perf/results/",
        "",
        *([f"- {p.relative_to(results.parent.parent)}" for p in committed] or ["None yet."]),
        "",
        performance_table(results) if results.exists() else "",
        "",
        "## What the cost model predicts on an H100 (bf16; a MODEL, not a measurement)",
        "",
        model_predictions().to_markdown(index=False, floatfmt=".3g"),
        "",
        f"torch {meta['torch']} · triton {meta['triton']} · gn_triton {meta['gn_triton']} (commit {meta['commit']})",
    ]
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(short)


def performance_table(results: Path) -> str:
    """The README's table from every committed GPU results folder: per device, mode, dtype and
    layout, the geometric-mean speedup over torch eager and torch.compile and gn_triton's median %
    of the copy bandwidth at batch 1 and 32."""
    rows = []
    for folder in sorted(p for p in results.iterdir() if (p / "run.json").exists() and (p / "sweep.csv").exists()):
        run, frames = load_run(folder)
        if run.get("env", {}).get("device") != "cuda":
            continue
        sweep = frames["sweep"]
        table = speedups(sweep[(sweep["stage"] == "core") & (sweep["activation"].fillna("none") == "none")])
        for (mode, dtype, layout), part in table.groupby(["mode", "dtype", "layout"], sort=False):
            peer = part.set_index("peer")["geomean_speedup"]
            first = part.iloc[0]
            rows.append(f"| {run['env']['gpu']} | {mode} | {dtype} | {layout} | "
                        f"{_x(peer.get('torch_eager'))} | {_x(peer.get('torch_compile'))} | "
                        f"{_pct(first['pct_copy_bw_N1'])} | {_pct(first['pct_copy_bw_N32'])} |")  # fmt: skip
    header = ["| GPU | mode | dtype | layout | vs torch eager | vs torch.compile | % copy BW, batch 1 | "
              "% copy BW, batch 32 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    if not rows:
        rows = ["| — | — | — | — | not measured | not measured | not measured | not measured |"]
    return "\n".join(header + rows)


def _x(value) -> str:
    return "—" if value is None or value != value else f"{value:.2f}×"


def _pct(value) -> str:
    return "—" if value != value else f"{value:.0f}%"


def main(argv=None) -> int:
    folder, meta, df = load_csv_argument("python -m perf.summary", __doc__, argv)
    print(console_table(df))
    write_summary(df, meta, folder / "SUMMARY.md")
    print(f"wrote {folder / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
