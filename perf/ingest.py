"""Turn the GPU benchmark job's files into committed results (on any machine, after the job).

    python -m perf.ingest RUN_DIR [perf/results/<gpu-name>/] [--readme README.md]

Copies the run's files (perf.gpu_evidence's output folder) into the results folder (default: perf/results/ and the
GPU's name from run.json), draws the throughput plots, writes SUMMARY.md (every stage's status and
its results; partial runs say which stages are missing), and regenerates the README's performance
table from every committed perf/results/*/ folder. A CPU rehearsal is summarised like a GPU run but
never reaches the README.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pandas as pd

from . import plot, summary
from .rows import command_line, load_run
from .summary import performance_table

ROOT = Path(__file__).resolve().parents[1]
TABLE_START, TABLE_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def sweep_meta(run: dict) -> dict:
    """The sweep's run-level metadata (perf.plot and perf.summary read it) from run.json's env."""
    env = run.get("env", {})
    return dict(run_kind="gpu-performance" if env.get("device") == "cuda" else "cpu-functional",
                device=env.get("gpu", "?"), sm_count=env.get("sm_count", 0),
                copy_gbps=env.get("copy_gbps", float("nan")), torch=env.get("torch", "?"),
                triton=env.get("triton", "?"), gn_triton=env.get("gn_triton", "?"), commit=env.get("commit", "?"),
                timestamp=run.get("started", "?"), activation="none", notes=[])  # fmt: skip


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g") if len(df) else "(no rows)"


def section(frames: dict[str, pd.DataFrame], name: str, write) -> list[str]:
    """A summary section from the run's `name`.csv, or a line saying there is none."""
    return write(frames[name]) if name in frames else [f"No {name} rows."]


def correctness_section(df: pd.DataFrame) -> list[str]:
    lines = [f"{int((df['status'] == 'ok').sum())} of {len(df)} cases pass every check."]
    bad = df[df["status"] != "ok"]
    if len(bad):
        lines += ["", "Failures:", "", _md(bad[["case", "plan", "layout", "dtype", "epilogue", "affine", "status"]])]
    return lines


def calibration_section(df: pd.DataFrame) -> list[str]:
    ok = df[df["status"] == "ok"]
    rows = []
    for (problem, n, direction, layout), part in ok.groupby(["problem", "N", "direction", "layout"], sort=False):
        best = part.loc[part["ms"].idxmin()]
        heuristic = part[part["role"] == "heuristic"]["ms"]
        tuned = part[part["role"] == "autotuner"]["ms"]
        rows.append(dict(problem=problem, N=n, direction=direction, layout=layout, plans=len(part),
                         heuristic_ms=heuristic.min(), autotuner_ms=tuned.min(), best_ms=best["ms"],
                         model_ms_of_best=best.get("predicted_ms"),
                         best_plan=f"split {best['split']} groups {best['groups_per_program']} tile "
                                   f"{best['block_c']}x{best['block_s']} warps {best['num_warps']} "
                                   f"wave {best['wave_blocks']}",
                         heuristic_over_best=heuristic.min() / best["ms"]))  # fmt: skip
    lines = [_md(pd.DataFrame(rows))]
    if "predicted_ms" in ok and ok["predicted_ms"].notna().any():
        ratio = (ok["ms"] / ok["predicted_ms"]).dropna()
        firsts = ok[ok["role"] == "heuristic"].set_index(["problem", "N", "direction", "layout"])["ms"]
        bests = ok[ok["role"] != "autotuner"].groupby(["problem", "N", "direction", "layout"])["ms"].min()
        hits = int((firsts <= bests.reindex(firsts.index) * 1.02).sum())
        lines += ["", f"Model against measurement: measured / predicted time median {ratio.median():.2f} "
                      f"(10th-90th percentile {ratio.quantile(0.1):.2f}-{ratio.quantile(0.9):.2f}) over "
                      f"{len(ratio)} plans; the model's first choice was within 2% of the fastest timed plan "
                      f"in {hits} of {len(firsts)} problems."]  # fmt: skip
    return lines


def traffic_section(df: pd.DataFrame) -> list[str]:
    cols = [c for c in ("shape", "N", "path", "direction", "launches", "traffic_over_floor", "status") if c in df]
    return [_md(df[cols])]


def write_summary(folder: Path, run: dict, frames: dict[str, pd.DataFrame]) -> Path:
    env = run.get("env", {})
    rehearsal = env.get("device") != "cuda"
    lines = [f"# gn_triton GPU evidence: {env.get('gpu', '?')}", ""]
    if rehearsal:
        lines += ["**CPU rehearsal in Triton's interpreter: not performance evidence.**", ""]
    lines += [f"{run.get('started', '?')} · torch {env.get('torch')} · triton {env.get('triton')} · python "
              f"{env.get('python')} · commit {env.get('commit')} · {env.get('sm_count')} SMs · L2 "
              f"{env.get('l2_bytes', 0) / 2**20:.0f} MiB · copy bandwidth {env.get('copy_gbps')} GB/s · "
              f"launch: gn_triton tiny call {env.get('gn_triton_call_us', float('nan')):.1f} µs from Python, "
              f"{env.get('gn_triton_call_graph_us', float('nan')):.1f} µs in a CUDA graph", "",
              f"Result: **{run.get('result')}**", "", "## Stages", ""]  # fmt: skip
    stages = pd.DataFrame(run.get("stages", []))
    lines += [_md(stages[[c for c in ("stage", "name", "status", "seconds", "note", "warm_up") if c in stages]]), ""]
    if env.get("host_path"):
        lines += [
            "## Where each call is bound (µs per call: calls back to back from Python, and the same call "
            "replayed from a CUDA graph, the GPU's time alone)",
            "",
            _md(pd.DataFrame(env["host_path"])),
            "",
        ]
    lines += ["## Correctness against the float64 reference", ""] + section(frames, "correctness", correctness_section)
    sweep = frames.get("sweep")
    lines += ["", "## Throughput (core table and broader sweep)", ""]
    if sweep is None:
        lines += ["No throughput rows."]
    else:
        for stage, part in sweep.groupby("stage", sort=False):
            lines += [f"### {stage}: speedup of gn_triton (geometric mean over shapes and batches)", "",
                      _md(summary.speedups(part)), ""]  # fmt: skip
            misses = summary.target_misses(part)
            if len(misses) and not rehearsal:
                lines += ["Below the bandwidth targets:", "", _md(misses), ""]
    lines += ["", "## Plan calibration (ms per call; heuristic vs the best candidate and the autotuner)", ""]
    lines += section(frames, "calibration", calibration_section)
    lines += ["", "## DRAM traffic over the floor (ncu)", ""] + section(frames, "traffic", traffic_section)
    sanitizer = folder / "sanitizer.txt"
    lines += ["", "## compute-sanitizer memcheck", ""]
    lines += [_sanitizer_result(sanitizer.read_text()) if sanitizer.exists() else "Not run."]
    models = frames.get("model_bench")
    lines += ["", "## Real models (diffusers, forward+backward)", "", _md(models) if models is not None else "Not run."]
    path = folder / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sanitizer_result(text: str) -> str:
    found = re.findall(r"ERROR SUMMARY: .*", text)
    status = re.findall(r"\[(exit \d+|killed[^\]]*)\]", text)
    return "; ".join(found + status) or text.strip()[-300:]


def plots(folder: Path, run: dict, sweep: pd.DataFrame | None) -> list[Path]:
    """Throughput against batch size per (mode, dtype, layout), plain GroupNorm rows only."""
    if sweep is None:
        return []
    plain = sweep[sweep["activation"].fillna("none") == "none"]
    return plot.plot_all(plain, sweep_meta(run), folder)


def update_readme(text: str, table: str) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + table + "\n" + text[end:]


def default_dest(run: dict) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run.get("env", {}).get("gpu", "unknown"))
    return ROOT / "perf" / "results" / name


def main(argv=None) -> int:
    parser = command_line("python -m perf.ingest", __doc__)
    parser.add_argument("source", type=Path, help="the job's output folder (perf.gpu_evidence --out)")
    parser.add_argument("dest", type=Path, nargs="?", help="results folder (default perf/results/<gpu-name>/)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    run, _ = load_run(args.source)
    dest = args.dest or default_dest(run)
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != args.source.resolve():
        for path in args.source.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, dest / path.name)
    run, frames = load_run(dest)
    for path in plots(dest, run, frames.get("sweep")):
        print(f"plot: {path}")
    print(f"wrote {write_summary(dest, run, frames)}")
    env = run.get("env", {})
    if "launch_us" in env:  # what gn_triton/_cost.py's DEVICES entry for this GPU should say
        print(
            f"cost model calibration for {env.get('gpu')}: copy_gbps={env.get('copy_gbps')}, "
            f"launch_us={env['launch_us']:.1f} (update gn_triton/_cost.py DEVICES with the run's date)"
        )
    if run.get("env", {}).get("device") != "cuda":
        print("a CPU rehearsal: the README's performance table is left as it is")
        return 0
    args.readme.write_text(update_readme(args.readme.read_text(), performance_table(dest.parent)))
    print(f"updated the performance table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
