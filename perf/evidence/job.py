"""What the stages of the benchmark job share: the output folder, the time box of a stage, the run's
context (device, timer, copy bandwidth) and small helpers (timing, the autotuner switch, subprocesses)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..rows import RowFile


class Clock:
    """A stage's deadline, checked between measurements."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.hit = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        self.hit = self.hit or self.left() <= 0
        return self.hit


class Job:
    """The output folder: run.json (rewritten atomically), log.txt and the row files."""

    def __init__(self, out: Path, budget_s: float, args: dict):
        self.out = out
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self._log = (out / "log.txt").open("a")
        self.run = dict(args=args, started=now(), env={}, stages=[], result="running")
        self._files: dict[str, RowFile] = {}

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f} s] {message}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def rows(self, name: str, columns: list[str]) -> RowFile:
        if name not in self._files:
            self._files[name] = RowFile(self.out / name, columns)
        return self._files[name]

    def save(self) -> None:
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(self.run, indent=1, default=str))
        os.replace(tmp, self.out / "run.json")

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Context:
    """What the stages share: device, timing, the copy bandwidth measured in stage 1."""

    device: str
    rehearse: bool
    rep_ms: int
    copy_gbps: float = float("nan")
    run: dict = field(default_factory=dict)  # sweep rows' run-level columns (perf.measure.run_columns)
    timer: object = None

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def timed(self, fn: Callable) -> float:
        """Seconds of one call of fn, the GPU's work included."""
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def error_status(exc: Exception, limit: int = 300) -> str:
    """A crash as a row's status: a result to bring back, not the end of the run."""
    return f"error: {type(exc).__name__}: {str(exc)[:limit]}"


@contextlib.contextmanager
def autotune(enabled: bool) -> Iterator[None]:
    """GN_TRITON_AUTOTUNE for the calls inside the block (the state before comes back after)."""
    previous = os.environ.get("GN_TRITON_AUTOTUNE")
    os.environ["GN_TRITON_AUTOTUNE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GN_TRITON_AUTOTUNE", None)
        else:
            os.environ["GN_TRITON_AUTOTUNE"] = previous


def run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def run_tool(job: Job, clock: Clock, cmd: list[str], log_name: str | None, env=None) -> str:
    """Run a command within the stage's time box; its output to `log_name` in the output folder."""
    if clock.left() < 5:
        clock.hit = True
        return "no time left"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=clock.left(), env=env)
        text, status = proc.stdout + proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        status, clock.hit = "killed at its time box", True
    if log_name:
        (job.out / log_name).write_text(f"$ {' '.join(cmd)}\n{text}\n[{status}]\n")
    job.log(f"  {' '.join(Path(c).name for c in cmd[:3])} ...: {status}; last line: {text.strip()[-200:]!r}")
    return status
