"""The time-boxed GPU benchmark job: every measurement gn_triton needs from a GPU, in one command that
ends by itself within its budget and keeps whatever it measured (perf/README.md says how to run it).

    bash perf/gpu_evidence.sh OUT_DIR 480                            # on the GPU host (installs first)
    python -m perf.gpu_evidence --out DIR --budget-s 480             # the same, gn_triton installed
    python -m perf.gpu_evidence --rehearse --out DIR --budget-s 180  # the same stages on a CPU
                                                                     # (Triton's interpreter, tiny shapes)

Afterwards `python -m perf.ingest DIR` copies the files to perf/results/<gpu-name>/, draws the plots,
writes SUMMARY.md and fills README.md's performance table.

Stages run in priority order. Each has a time box (its share of the budget plus what earlier stages
left unused), checks it between measurements, and writes every row to disk as it is measured, so a
run killed at any moment keeps everything measured so far. When the budget runs out the run ends
itself with the line "stopped at budget after stage K" and exit status 0.

  1 env          GPU, SMs, L2, clocks, driver, versions, copy bandwidth, launch costs
  2 correctness  the test suite's cases (tests/cases.py: every forced path x layout x dtype, every
                 epilogue and affine) and comparison (tests/gn_testing.py), model-sized shapes, bitwise
                 repeatability, one input of more than 2^31 elements with a single group
  3 core         SD VAE and U-Net shapes, batch 1/4/16/32, forward and backward, bf16, contiguous
                 then channels_last: gn_triton (heuristic plan), torch eager, torch.compile
  4 calibration  every candidate plan (bounded) of a few problems, the heuristic's and the
                 autotuner's pick, beside the cost model's prediction
  5 traffic      DRAM bytes measured by ncu / floor bytes, fused vs split-in-waves plans
  6 sanitizer    compute-sanitizer memcheck over small cases of every path
  7 models       diffusers U-Net/VAE forward+backward at batch 1: torch, gn_triton, torch.compile and
                 torch.compile with gn_triton's fusion (perf.model_bench; needs diffusers)
  8 broad        the other suites, fused SiLU, fp16/fp32, row by row until the budget ends

Before stages 2-4 and 8 on a GPU, worker processes run the stage's gn_triton calls once, in
parallel, so the kernels compile on many cores into Triton's on-disk cache (a fresh host compiles
hundreds of variants); the measurements then load them. First-call seconds are recorded per row.

Files, flat, at most --max-files of them (default 8, for job systems that return a limited number of
artifacts): run.json (environment, arguments, each stage's status and seconds; rewritten
atomically), log.txt, correctness.csv, sweep.csv (stages 3 and 8, perf.sweep's schema),
calibration.csv, traffic.csv, sanitizer.txt, model_bench.csv.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .evidence import calibration, correctness, env, throughput, tools, traffic
from .evidence.job import Clock, Context, Job, now
from .measure import use_interpreter
from .rows import command_line

FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Stage:
    name: str
    share: float  # of the budget; unused time of earlier stages is added to it
    run: Callable  # run(job, ctx, clock) -> note (str)
    warm: Callable | None = None  # warm(ctx) -> the stage's calls, pre-run by workers on a GPU to compile


STAGES = [
    Stage("env", 0.04, env.stage_env),
    Stage("correctness", 0.18, correctness.stage_correctness, correctness.warm_correctness),
    Stage("core", 0.34, throughput.stage_core, throughput.warm_core),
    Stage("calibration", 0.12, calibration.stage_calibration, calibration.warm_calibration),
    Stage("traffic", 0.07, traffic.stage_traffic),
    Stage("sanitizer", 0.07, tools.stage_sanitizer),
    Stage("models", 0.12, tools.stage_models),
    Stage("broad", 0.06, throughput.stage_broad, throughput.warm_broad),
]


def run_stages(job: Job, ctx: Context, budget_s: float, kill_after: int | None) -> None:
    min_stage_s = 1.0 if ctx.rehearse else 8.0
    carry = 0.0
    last_done = 0
    for k, stage in enumerate(STAGES, 1):
        record = dict(stage=k, name=stage.name, status="not run: budget")
        job.run["stages"].append(record)
        if job.left() < min_stage_s:
            continue
        start = time.monotonic()
        clock = Clock(min(job.deadline, start + stage.share * budget_s + carry))
        record.update(status="running", started=now())
        job.save()
        job.log(f"stage {k} {stage.name}: start ({clock.left():.0f} s box)")
        try:
            if stage.warm and not ctx.rehearse:
                ctx.free()  # the workers share the GPU's memory
                record["warm_up"] = warm_stage(job, stage.name, 0.5 * clock.left())
            record["note"] = stage.run(job, ctx, clock)
            record["status"] = "stopped at its time box" if clock.hit else "done"
        except Exception as exc:
            record["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
            job.log(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - start, 1)
        job.log(f"stage {k} {stage.name}: {record['status']} in {record['seconds']} s; {record.get('note', '')}")
        job.save()
        last_done = k
        carry = max(0.0, clock.deadline - time.monotonic())
        if kill_after == k:  # tests: a run killed here must have everything so far on disk
            os.kill(os.getpid(), signal.SIGKILL)
    job.run["result"] = f"stopped at budget after stage {last_done}" if last_done < len(STAGES) else "all stages run"
    job.log(job.run["result"])
    job.save()


# ---------------------------------------------------------------------------------------------
# Parallel warm-up: compile a stage's kernels on many cores into Triton's on-disk cache


def warm_stage(job: Job, stage: str, seconds: float) -> str:
    """Run the stage's warm-up calls in worker processes (each takes every W-th call), for at most
    `seconds`; their compilations land in the on-disk caches the measuring process then reads."""
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "perf.gpu_evidence", "--warm", stage, "--workers", str(workers), "--worker"]
    start = time.monotonic()
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")  # the workers are the parallelism
    procs = [subprocess.Popen(cmd + [str(k)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k in range(workers)]  # fmt: skip
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, start + seconds - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append(proc.communicate()[0] + "\n[killed at the warm-up limit]")
    summary = f"warm-up of {stage}: {workers} workers, {time.monotonic() - start:.0f} s"
    job.log("  " + summary + "; " + " | ".join(o.strip().splitlines()[-1] if o.strip() else "-" for o in outputs))
    return summary


def warm_worker(stage: str, worker: int, workers: int) -> int:
    """One warm-up worker: every workers-th call of the stage, from the worker-th; an error (or out
    of memory in its share of the GPU) only skips that call."""
    torch.cuda.set_per_process_memory_fraction(0.9 / workers)
    ctx = Context("cuda", rehearse=False, rep_ms=0)
    calls = next(s for s in STAGES if s.name == stage).warm(ctx)[worker::workers]
    failed = 0
    for call in calls:
        try:
            call()
        except Exception:
            failed += 1
        torch.cuda.empty_cache()
    print(f"worker {worker}: {len(calls)} calls, {failed} failed")
    return 0


# ---------------------------------------------------------------------------------------------
# Driver


def check_output_folder(out: Path, max_files: int) -> list[str]:
    """What breaks the output folder's contract: more than max_files files, sub-folders, odd names."""
    problems = []
    files = [p for p in out.iterdir() if not p.name.startswith(".")]
    if len(files) > max_files:
        problems.append(f"{len(files)} files (the limit is {max_files})")
    problems += [f"{p.name}: not a plain file" for p in files if not p.is_file()]
    problems += [f"{p.name}: name has characters other than letters, digits, . _ -" for p in files
                 if not FILE_NAME.match(p.name)]  # fmt: skip
    return problems


def parse_args(argv):
    p = command_line("python -m perf.gpu_evidence", __doc__)
    p.add_argument("--out", type=Path, help="output folder (flat: every file at its top level)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all stages (default 480)")
    p.add_argument("--max-files", type=int, default=8, help="files the output folder may hold (default 8)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal: interpreter, tiny shapes")
    p.add_argument("--rep-ms", type=int, default=40, help="GPU timing window per measurement (ms)")
    p.add_argument("--kill-after-stage", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL itself
    p.add_argument("--warm", help=argparse.SUPPRESS)  # internal: a warm-up worker of this stage
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warm:
        return warm_worker(args.warm, args.worker, args.workers)
    if args.out is None:
        raise SystemExit("--out DIR is required")
    rehearse = args.rehearse or not torch.cuda.is_available()
    if rehearse:
        use_interpreter()
    job = Job(args.out, args.budget_s, {k: v for k, v in vars(args).items() if v is not None})
    job.log(("REHEARSAL on the CPU (Triton's interpreter, tiny shapes): not performance evidence. "
             if rehearse else "") + f"budget {args.budget_s:.0f} s, output {args.out}")  # fmt: skip
    run_stages(job, Context("cpu" if rehearse else "cuda", rehearse, args.rep_ms), args.budget_s, args.kill_after_stage)
    for problem in check_output_folder(args.out, args.max_files):
        job.log(f"WARNING: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
