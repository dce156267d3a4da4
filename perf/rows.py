"""CSV files written row by row: a run killed at any moment keeps every row it measured.

The sweep and the GPU evidence run share the sweep's row schema (SWEEP_COLUMNS), so the summary and
plot steps read either.
"""

from __future__ import annotations

import csv
from pathlib import Path

# One row per (provider, configuration) of a throughput measurement; absent values stay empty.
SWEEP_COLUMNS = [
    "stage", "run_kind", "device", "sm_count", "copy_gbps", "torch", "triton", "gn_triton", "commit", "timestamp",
    "activation", "provider", "mode", "dtype", "layout", "suite", "shape", "N", "C", "spatial", "G", "floor_bytes",
    "status", "check_error", "ms", "ms_p20", "ms_p80", "timer", "gbps", "pct_copy_bw", "samples_per_s",
    "first_call_s",
]  # fmt: skip


class RowFile:
    """Appends dict rows to a CSV with fixed columns, flushed after every row (a kill -9 loses
    nothing written). The header is written when the file is new or empty."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        self.count = 0
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="raise")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _cell(v) for k, v in row.items()})
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value
