"""The perf harness: the functional sweep end to end, and the plot and summary steps on a synthetic
GPU-like CSV (the numbers there are made up to test the arithmetic, never reported)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gn_triton._cost import floor_bytes
from perf import plot, summary, sweep
from perf.rows import COLUMNS, Row, RowFile, load_run
from perf.sweep import custom_shape

ROOT = Path(__file__).resolve().parents[1]


def test_floor_bytes_and_custom_shape_in_explains_grammar():
    assert floor_bytes("fwd", 10, 2) == 40 and floor_bytes("bwd", 10, 2) == 60 and floor_bytes("fwd+bwd", 10, 4) == 200
    shape, N = custom_shape("2x128x20x256x256:16")
    assert (N, shape.C, shape.spatial, shape.G) == (2, 128, (20, 256, 256), 16)
    assert custom_shape("1x320x64x64")[0].G == 32
    with pytest.raises(SystemExit, match="num_groups must be positive"):
        custom_shape("1x320x64x64:0")
    args = sweep.parse_args(["--shape", "4x320x64x64:32", "2x64x8x8:8"])
    assert sweep.plan_sweep(args, functional=False).batches == (2, 4)  # the shapes' N
    args = sweep.parse_args(["--shape", "4x320x64x64:32", "--batch", "1"])
    assert sweep.plan_sweep(args, functional=False).batches == (1,)


def test_functional_sweep_end_to_end_runs_the_interpreter(tmp_path):
    """`make bench` on a CPU: started without TRITON_INTERPRET (as a user would), the sweep must still
    run gn_triton's kernels in the interpreter, not torch's fallback: gn_triton's errors then differ
    from torch eager's at the same points."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "perf.sweep", "--functional", "--batch", "1", "2", "--mode", "fwd", "bwd",
         "--dtype", "fp32", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No GPU present" in proc.stdout and "FUNCTIONAL" in proc.stdout and "| gn_triton " in proc.stdout
    df = pd.read_csv(tmp_path / "sweep.csv")
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["run_kind"] == "cpu-functional" and meta["copy_gbps"] > 0
    ok = df[df["status"] == "ok"]
    assert set(ok["provider"]) == {"gn_triton", "torch_eager"}
    assert (ok["check_error"] < 1e-4).all() and (ok["ms"] > 0).all()
    keys = ["shape", "N", "mode", "layout"]
    errors = ok.pivot_table(index=keys, columns="provider", values="check_error")
    differ = (errors["gn_triton"] != errors["torch_eager"]).mean()
    assert differ > 0.5, errors  # torch's fallback would equal torch eager at every point
    for column in ("provider", "mode", "dtype", "layout", "suite", "N", "C", "spatial", "G", "ms", "ms_p20", "ms_p80",
                   "gbps", "pct_copy_bw", "samples_per_s", "device", "torch", "triton", "gn_triton", "commit",
                   "timestamp"):  # fmt: skip
        assert column in df.columns, column
    assert df[df["status"].str.startswith("skipped")]["status"].str.contains("4-D or 5-D").all()
    summary_text = (tmp_path / "SUMMARY.md").read_text()
    for text in ("No GPU here", "Correct results against the float64 reference", "GPU results committed",
                 "What the cost model predicts on an H100", "a MODEL, not a measurement"):  # fmt: skip
        assert text in summary_text, text
    assert "| gn_triton   | fp32    |" in summary_text  # correct/incorrect counts per provider and dtype
    assert [p.name for p in tmp_path.glob("*.png")] == ["errors.png"]  # no throughput plot of interpreter timings
    assert (tmp_path / "errors.png").stat().st_size > 10_000
    # The verdict comes first, before any table (the model's predictions are a long one)
    first_table = summary_text.index("\n|")
    assert 0 <= summary_text.index("**Result: ") < first_table, summary_text[:600]
    checked = int((~df["status"].str.startswith("skipped")).sum())
    assert "results correct, 0 wrong or failed**" in summary_text and f" of {checked} results" in summary_text
    assert "environment: " in proc.stdout  # says which stack it benches


def test_error_figure_has_a_key_and_the_pass_line(tmp_path, monkeypatch):
    """errors.png names each numbered point's case and draws perf.measure's bound for the dtype."""
    from perf import measure

    drawn = {}
    real_save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path, rect=None: drawn.setdefault("fig", fig) and real_save(
        fig, path, rect))  # fmt: skip
    cases = [(shape, N) for shape in ("C32 8x8 G8", "C64 4x4 G32") for N in (1, 2)]
    rows = [dict(shape=shape, N=N, mode="fwd", layout="contiguous", provider=p, dtype="fp32", check_error=1e-7)
            for shape, N in cases for p in ("gn_triton", "torch_eager")]  # fmt: skip
    plot.error_figure(pd.DataFrame(rows), dict(device="cpu"), tmp_path / "errors.png")
    texts = " ".join(t.get_text() for ax in drawn["fig"].axes for t in ax.texts)
    for k, (shape, N) in enumerate(cases):
        assert f"{k}: {shape}, N={N}, fwd, contiguous" in texts
    lines = [line.get_ydata()[0] for line in drawn["fig"].axes[0].get_lines()]
    assert measure.CHECK_TOL[measure.DTYPES["fp32"]] in lines


def synthetic_sweep() -> tuple[pd.DataFrame, dict]:
    meta = dict(run_kind="gpu-performance", device="Synthetic GPU", sm_count=132, copy_gbps=3000.0, torch="t",
                triton="t", gn_triton="0", commit="abc", timestamp="now", notes=[])  # fmt: skip
    rows = []
    for shape, numel in (("C320 64x64 G32", 320 * 4096), ("C128 512x512 G32", 128 * 512 * 512)):
        for N in (1, 2, 32):
            for provider, factor in (("gn_triton", 1.0), ("torch_eager", 4.0), ("torch_compile", 1.5)):
                nbytes = floor_bytes("fwd", N * numel, 2)
                ms = nbytes / (2400e6 if provider == "gn_triton" else 2400e6 / factor)  # 80% of 3000 GB/s
                if shape.startswith("C128") and N == 1 and provider == "gn_triton":
                    ms *= 2  # one slow point: 40% of copy bandwidth
                gbps = nbytes / ms / 1e6
                rows.append(dict(provider=provider, mode="fwd", dtype="bf16", layout="contiguous", suite="s",
                                 shape=shape, N=N, floor_bytes=nbytes, status="ok", ms=ms, gbps=gbps,
                                 pct_copy_bw=100 * gbps / 3000))  # fmt: skip
    rows.append(dict(provider="liger", mode="fwd", dtype="bf16", layout="contiguous", suite="s", shape="x", N=1,
                     status="skipped: Liger-Kernel not importable"))  # fmt: skip
    return pd.DataFrame(rows), meta


def test_summary_arithmetic(tmp_path):
    df, meta = synthetic_sweep()
    table = summary.speedups(df).set_index("peer")
    # torch_eager is 4x slower everywhere except the one point where gn_triton is 2x slower (2x there).
    assert table.loc["torch_eager", "geomean_speedup"] == pytest.approx(math.exp((5 * math.log(4) + math.log(2)) / 6))
    assert table.loc["torch_eager", "worst_speedup"] == pytest.approx(2.0)
    assert table.loc["torch_compile", "worst_speedup"] == pytest.approx(0.75)
    assert table.loc["torch_eager", "pct_copy_bw_N32"] == pytest.approx(80.0)
    misses = summary.target_misses(df)
    assert list(misses["N"]) == [1] and list(misses["shape"]) == ["C128 512x512 G32"]  # >= 16 MB only
    summary.write_summary(df, meta, tmp_path / "SUMMARY.md")
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "Synthetic GPU" in text and "torch_compile" in text and "Liger-Kernel not importable" in text


def test_plots_from_csv(tmp_path):
    df, meta = synthetic_sweep()
    paths = plot.plot_all(df, meta, tmp_path)
    assert [p.name for p in paths] == ["throughput_fwd_bf16_contiguous.png", "speedup.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize("module", ["perf.plot", "perf.summary", "perf.sweep", "perf.ingest", "perf.gpu_evidence"])
def test_command_line_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def test_rows_append_per_run_and_readers_take_the_latest(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(dict(device="x")))
    for run_id, n in (("2026-01-01", 2), ("2026-01-02", 1)):
        rows = RowFile(tmp_path / "sweep.csv")  # a new run appends, header once
        for N in range(n):
            rows.write(Row(run_id=run_id, provider="gn_triton", N=N + 1, status="ok", ms=1.5))
        rows.close()
    assert (tmp_path / "sweep.csv").read_text().count("run_id") == 1
    meta, frames = load_run(tmp_path)
    latest = frames["sweep"]
    assert meta == {"device": "x"} and list(latest["run_id"]) == ["2026-01-02"]
    assert len(load_run(tmp_path, all_runs=True)[1]["sweep"]) == 3
    assert list(latest.columns) == COLUMNS
