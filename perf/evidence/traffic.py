"""Stage 5: DRAM traffic measured by Nsight Compute (ncu) against the floor bytes, for a fused and a
split-in-waves plan of two large problems: whether the second read of each path really comes from L2.
Skipped, with the reason in traffic.csv, where there is no ncu and on a ROCm build of torch.

    python -m perf.evidence.traffic INDEX PATH   # the profiled case; the stage runs it under ncu
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
import sys

import torch

from ..suites import SUITES, Shape
from .job import Clock, Context, Job, error_status

COLUMNS = ["shape", "N", "dtype", "path", "direction", "launches", "dram_read_bytes", "dram_write_bytes",
           "floor_bytes", "traffic_over_floor", "status"]  # fmt: skip
CASES = [(SUITES["sd_vae"][3], 1), (SUITES["sd_unet"][0], 32)]
METRICS = "dram__bytes_read.sum,dram__bytes_write.sum"


def plans(shape: Shape, N: int) -> dict[str, dict]:
    """The forced plans compared: fused (one launch, the second read from L1/L2 if resident blocks
    fit) and split in L2-sized waves."""
    from gn_triton import _tuning
    from gn_triton._tuning import Problem

    p = Problem(N=N, C=shape.C, S=math.prod(shape.spatial), G=shape.G, dtype=torch.bfloat16, channels_last=False,
                has_weight=True, has_bias=True)  # fmt: skip
    sms, l2_bytes = _tuning.device_info(torch.device("cuda"))
    wave = _tuning._wave_blocks("bwd", p, 1, l2_bytes)
    return {"fused": dict(split=1), "split_waves": dict(split=max(2, -(-4 * sms // (wave or p.blocks(1)))),
                                                        wave_blocks=wave)}  # fmt: skip


def profiled_case(index: int, path: str) -> None:
    """Run inside ncu: one forward and one backward with a forced plan, inside the NVTX range 'gn'
    (compilation and warm-up outside it)."""
    import gn_triton
    from gn_triton import _tuning

    shape, N = CASES[index]
    x = torch.randn(shape.full(N), device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(shape.C, device="cuda", requires_grad=True)
    b = torch.randn(shape.C, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with _tuning.override_plan(**plans(shape, N)[path]):
        gn_triton.group_norm(x, shape.G, w, b).backward(dy)  # compile, warm up
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range("gn"):
            gn_triton.group_norm(x, shape.G, w, b).backward(dy)
        torch.cuda.synchronize()


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --print-units base rows: kernel name, metric name, value in bytes."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        if rec.get("Metric Name") in METRICS.split(","):
            scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(rec.get("Metric Unit", "byte"), 1)
            value = float(rec["Metric Value"].replace(",", "")) * scale
            rows.append(dict(kernel=rec["Kernel Name"], metric=rec["Metric Name"], bytes=value))
    return rows


def rocm_skip_reason() -> str:
    """Why a ROCm host skips this stage: ncu profiles NVIDIA GPUs only, and the ROCm profiler's DRAM
    counters (rocprofv3 --pmc FETCH_SIZE WRITE_SIZE, per dispatch, without the NVTX range filter this
    stage relies on) are not wired up."""
    found = shutil.which("rocprofv3") or shutil.which("rocprof")
    return f"ROCm: ncu is NVIDIA-only; DRAM counters from {found or 'rocprofv3 (not found)'} are not wired up"


def stage_traffic(job: Job, ctx: Context, clock: Clock) -> str:
    from gn_triton._cost import floor_bytes, is_rocm

    out = job.rows("traffic.csv", COLUMNS)
    ncu = shutil.which("ncu")
    if ctx.device != "cuda" or ncu is None or is_rocm():
        why = "rehearsal: no GPU" if ctx.device != "cuda" else rocm_skip_reason() if is_rocm() else "ncu not found"
        out.write(dict(shape="-", status=f"skipped: {why}"))
        return f"skipped ({why})"
    done = 0
    for index, (shape, N) in enumerate(CASES):
        for path in plans(shape, N):
            if clock.left() < 10:
                clock.hit = True
                return f"{done} profiles"
            cmd = [ncu, "--clock-control", "none", "--metrics", METRICS, "--csv", "--print-units", "base",
                   "--nvtx", "--nvtx-include", "gn/", sys.executable, "-m", "perf.evidence.traffic", str(index),
                   path]  # fmt: skip
            base = dict(shape=shape.label, N=N, dtype="bf16", path=path)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=clock.left())
                rows = parse_ncu_csv(proc.stdout)
                if not rows:
                    raise RuntimeError(f"no ncu rows (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-300:]}")
            except Exception as exc:
                out.write(dict(base, status=error_status(exc)))
                continue
            numel = math.prod(shape.full(N))
            for direction, prefix in (("fwd", "_gn_fwd"), ("bwd", "_gn_bwd")):
                mine = [r for r in rows if prefix in r["kernel"]]
                read = sum(r["bytes"] for r in mine if r["metric"].startswith("dram__bytes_read"))
                write = sum(r["bytes"] for r in mine if r["metric"].startswith("dram__bytes_write"))
                floor = floor_bytes(direction, numel, 2)
                out.write(dict(base, direction=direction, launches=len(mine) // 2, dram_read_bytes=read,
                               dram_write_bytes=write, floor_bytes=floor, traffic_over_floor=(read + write) / floor,
                               status="ok"))  # fmt: skip
            done += 1
    return f"{done} profiles"


if __name__ == "__main__":
    profiled_case(int(sys.argv[1]), sys.argv[2])
