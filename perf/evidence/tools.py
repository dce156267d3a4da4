"""Stages 6 and 7: external tools run as subprocesses within their time box: compute-sanitizer's
memcheck over a small case of every path (perf/sanitize_case.py), and the diffusers models
(perf/model_bench.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .job import Clock, Context, Job, run_tool

SANITIZE_CASE = Path(__file__).resolve().parents[1] / "sanitize_case.py"


def stage_sanitizer(job: Job, ctx: Context, clock: Clock) -> str:
    case = [sys.executable, str(SANITIZE_CASE)]
    if ctx.device != "cuda":  # rehearsal: the case itself, in the interpreter
        env = dict(os.environ, TRITON_INTERPRET="1")
        return "rehearsal (no compute-sanitizer): " + run_tool(job, clock, case + ["--device", "cpu"], "sanitizer.txt",
                                                               env)  # fmt: skip
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        (job.out / "sanitizer.txt").write_text("compute-sanitizer not found\n")
        return "skipped: compute-sanitizer not found"
    return run_tool(job, clock, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *case], "sanitizer.txt")


def stage_models(job: Job, ctx: Context, clock: Clock) -> str:
    if ctx.device != "cuda":
        return "skipped: rehearsal (model_bench needs a GPU)"
    # Batch 1 only: each compiled provider compiles a whole U-Net and VAE forward+backward (minutes on a
    # bare machine); model_bench rewrites its CSV after every model and batch, so a kill keeps the rest.
    cmd = [sys.executable, "-m", "perf.model_bench", "--out", str(job.out), "--batch", "1"]
    return run_tool(job, clock, cmd, None)
