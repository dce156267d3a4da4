"""The throughput row (typed), CSV files written row by row, and the one loader of a run's results.

The sweep and the GPU evidence run write the same Row to sweep.csv; a kill at any moment keeps every
row already measured. A sweep appends to its CSV (each run's rows carry its run_id); readers take
the latest run unless told otherwise.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Row:
    """One provider at one point (shape, batch, mode, dtype, layout, activation) of a run."""

    # the run
    run_id: str = ""
    stage: str = ""  # "sweep", or the evidence run's stage ("core", "broad")
    run_kind: str = ""  # "gpu-performance" or "cpu-functional"
    device: str = ""
    sm_count: int = 0
    copy_gbps: float = 0.0  # measured in the same run
    torch: str = ""
    triton: str = ""
    gn_triton: str = ""
    commit: str = ""
    kernel_version: str = ""  # gn_triton.kernels.KERNEL_VERSION: the kernels' source hash the row measured
    timestamp: str = ""
    # the point
    activation: str = "none"
    provider: str = ""
    mode: str = ""  # fwd, bwd, fwd+bwd
    dtype: str = ""
    layout: str = ""
    suite: str = ""
    shape: str = ""
    N: int = 0
    C: int = 0
    spatial: str = ""
    G: int = 0
    floor_bytes: int = 0
    # the outcome
    status: str = ""  # ok, skipped: ..., wrong: ..., error: ...
    check_error: float | None = None  # max error / max |float64 reference|
    ms: float | None = None  # median; p20 and p80 beside it
    ms_p20: float | None = None
    ms_p80: float | None = None
    timer: str = ""
    gbps: float | None = None  # floor bytes per second
    pct_copy_bw: float | None = None
    samples_per_s: float | None = None
    first_call_s: float | str | None = None  # the first call, compilation included


COLUMNS = [f.name for f in dataclasses.fields(Row)]


class RowFile:
    """Appends rows (a Row or a dict of the file's columns) to a CSV, flushed after every row (a
    kill -9 loses nothing written). The header is written when the file is new or empty."""

    def __init__(self, path: Path, columns: list[str] = COLUMNS):
        self.path = Path(path)
        self.count = 0
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="raise")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: Row | dict) -> None:
        values = dataclasses.asdict(row) if isinstance(row, Row) else row
        self._writer.writerow({k: _cell(v) for k, v in values.items()})
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def load_run(folder: Path, all_runs: bool = False) -> tuple[dict, dict[str, pd.DataFrame]]:
    """run.json and every CSV of a results folder (a sweep's or an evidence run's) by name: "sweep",
    "correctness", ... (an empty file is left out). A CSV that several runs appended to is cut to the
    latest run's rows unless all_runs."""
    folder = Path(folder)
    meta = json.loads((folder / "run.json").read_text())
    frames = {}
    for path in sorted(p for p in folder.glob("*.csv") if p.stat().st_size):
        df = pd.read_csv(path)
        if not all_runs and "run_id" in df and df["run_id"].nunique() > 1:
            df = df[df["run_id"] == df["run_id"].iloc[-1]]
        frames[path.stem] = df
    return meta, frames


def command_line(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser for one of perf's commands, its module docstring as the help."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def load_csv_argument(prog: str, doc: str, argv) -> tuple[Path, dict, pd.DataFrame]:
    """The command line of a step derived from a sweep CSV: (its folder, run.json, the latest run's rows)."""
    parser = command_line(prog, doc)
    parser.add_argument("csv", type=Path, help="a sweep.csv beside its run.json; the outputs go beside it")
    folder = parser.parse_args(argv).csv.parent
    meta, frames = load_run(folder)
    return folder, meta, frames["sweep"]
