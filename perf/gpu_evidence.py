"""GPU evidence in one time-boxed command: what a short, rare GPU lease must bring back.

    python -m perf.gpu_evidence --out DIR --budget-s 480            # on a GPU machine
    python -m perf.gpu_evidence --rehearse --out DIR --budget-s 120  # the same stages on a CPU
                                                                     # (Triton's interpreter, tiny shapes)

The device call, exactly (the device tool's `run`; give it timeout_s=570, and carry=[".whl"] when
wheels were downloaded into .whl/ as README "Performance" says):

    bash perf/gpu_evidence.sh "$OUT" 480

(`perf/gpu_evidence.sh` installs carried wheels offline, installs this package without
dependencies, and runs this module.) Afterwards, on the CPU: `python -m perf.ingest FILES_AT
perf/results/<gpu-name>/` copies the files, draws the plots, writes SUMMARY.md and fills the README's
performance table; commit that folder and README.md.

Stages run in priority order. Each has a time box (its share of the budget plus what earlier stages
left unused), checks it between measurements, and writes every row to disk as it is measured, so a
run killed at any moment keeps everything measured so far. When the budget runs out the run ends
itself with the line "stopped at budget after stage K" and exit status 0.

  1 env          GPU, SMs, L2, clocks, driver, versions, copy bandwidth, launch costs
  2 correctness  every path (fused, several groups per program, split, split in waves, heuristic) x
                 layout x dtype, every epilogue, odd sizes, bitwise repeatability, one input of more
                 than 2^31 elements with a single group, against the float64 reference
  3 core         SD VAE and U-Net shapes, batch 1/4/16/32, forward and backward, bf16, contiguous
                 then channels_last: gn_triton (heuristic plan), torch eager, torch.compile
  4 calibration  every candidate plan (bounded) of a few problems, the heuristic's and the
                 autotuner's pick
  5 traffic      DRAM bytes measured by ncu / floor bytes, fused vs split-in-waves plans
  6 sanitizer    compute-sanitizer memcheck over small cases of every kernel
  7 models       diffusers U-Net/VAE forward+backward at batch 1: torch, gn_triton, torch.compile and
                 torch.compile with gn_triton's fusion (perf.model_bench; needs carried wheels)
  8 broad        the other suites, fused SiLU, fp16/fp32, row by row until the budget ends

Before stages 2-4 and 8 on a GPU, worker processes run the stage's gn_triton calls once, in
parallel, so the kernels compile on many cores into Triton's on-disk cache (a bare machine compiles
hundreds of variants); the measurements then load them. First-call seconds are recorded per row.

Files (flat, at most 8, as the device tool brings back): run.json (environment, arguments, each
stage's status and seconds; rewritten atomically), log.txt, correctness.csv, sweep.csv (stages 3
and 8, perf.sweep's schema), calibration.csv, traffic.csv, sanitizer.txt, model_bench.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gn_triton._cost import floor_bytes

from .measure import DTYPES, Point, Timer, copy_bandwidth, git_commit, make_call, make_inputs, run_columns, run_points
from .rows import COLUMNS, RowFile
from .suites import SUITES, Shape

MAX_FILES = 8
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
CORRECTNESS_COLUMNS = ["case", "path", "layout", "dtype", "epilogue", "shape", "G", "output", "error", "tolerance",
                       "status", "seconds"]  # fmt: skip
CALIBRATION_COLUMNS = ["problem", "N", "direction", "dtype", "layout", "role", "split", "groups_per_program",
                       "block_c", "block_s", "num_warps", "wave_blocks", "programs", "launches", "floor_bytes",
                       "predicted_ms", "predicted_traffic", "status", "ms", "gbps", "pct_copy_bw",
                       "first_call_s"]  # fmt: skip
TRAFFIC_COLUMNS = ["shape", "N", "dtype", "path", "direction", "launches", "dram_read_bytes", "dram_write_bytes",
                   "floor_bytes", "traffic_over_floor", "status"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The run: budget, stages, files


@dataclass
class Stage:
    name: str
    share: float  # of the budget; unused time of earlier stages is added to it
    run: Callable  # run(ev, ctx, clock) -> note (str)
    warm: bool = False  # on a GPU, workers first pre-run its cases (WARMERS) to compile its kernels


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


class Evidence:
    """The output folder: run.json (rewritten atomically), log.txt and the row files."""

    def __init__(self, out: Path, budget_s: float, args: dict):
        self.out = out
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self._log = (out / "log.txt").open("a")
        self.run = dict(args=args, started=_now(), env={}, stages=[], result="running")
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        torch.cuda.synchronize()


def _timed(ctx: Context, fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    _sync(ctx)
    return time.perf_counter() - start


@contextlib.contextmanager
def _autotune(enabled: bool) -> Iterator[None]:
    previous = os.environ.get("GN_TRITON_AUTOTUNE")
    os.environ["GN_TRITON_AUTOTUNE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GN_TRITON_AUTOTUNE", None)
        else:
            os.environ["GN_TRITON_AUTOTUNE"] = previous


def _free(ctx: Context) -> None:
    if ctx.device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Stage 1: environment


def stage_env(ev: Evidence, ctx: Context, clock: Clock) -> str:
    import triton

    import gn_triton

    env = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
               gn_triton=gn_triton.__version__, commit=git_commit(), platform=platform.platform(),
               cpu_count=os.cpu_count(), device=ctx.device)  # fmt: skip
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, l2_bytes=props.L2_cache_size,
                   memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda)  # fmt: skip
        env["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                       "clocks.mem,clocks.max.mem,power.limit,temperature.gpu",
                                       "--format=csv"])  # fmt: skip
    else:
        env.update(gpu=f"cpu-{platform.machine()}-rehearsal", sm_count=0)
    ev.run["env"] = env
    ev.save()
    ctx.timer = Timer(ctx.device, ctx.rep_ms)
    ctx.copy_gbps = copy_bandwidth(ctx.device, ctx.timer)
    env["copy_gbps"] = round(ctx.copy_gbps, 1)
    with _autotune(False):
        env.update(_launch_costs(ctx))
    ctx.run = run_columns(ctx.device, env["gpu"], ctx.copy_gbps, stage="")
    ev.save()
    return f"{env['gpu']}: copy {env['copy_gbps']} GB/s, gn_triton tiny call {env['gn_triton_call_us']:.1f} us"


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def _launch_costs(ctx: Context) -> dict:
    """Microseconds per call of a tiny gn_triton call and a tiny torch op, launched back to back from
    Python (host-bound); the cost of one more Triton launch (a 16-launch plan against a 1-launch plan
    of the same call: the cost model's launch_us); and the gn_triton call replayed in a CUDA graph
    (the GPU side alone)."""
    import gn_triton
    from gn_triton import _tuning

    x = torch.randn(1, 32, 8, 8, device=ctx.device)
    ones = torch.ones(1, device=ctx.device)
    calls = 200 if ctx.device == "cuda" else 5

    def per_call(fn):
        fn()
        _sync(ctx)
        return _timed(ctx, lambda: [fn() for _ in range(calls)]) / calls * 1e6

    out = dict(gn_triton_call_us=per_call(lambda: gn_triton.group_norm(x, 8)),
               torch_tiny_op_us=per_call(lambda: ones.add_(1)))  # fmt: skip
    with _tuning.override_plan(split=1, groups_per_program=1, block_s=32):
        one = per_call(lambda: gn_triton.group_norm(x, 8))
    with _tuning.override_plan(split=2, groups_per_program=1, block_s=32, wave_blocks=1):  # 8 waves x 2
        sixteen = per_call(lambda: gn_triton.group_norm(x, 8))
    out["launch_us"] = (sixteen - one) / 15
    if ctx.device == "cuda":
        import triton.testing

        out["gn_triton_call_graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(lambda: gn_triton.group_norm(x, 8))
    return out


# ---------------------------------------------------------------------------------------------
# Stage 2: correctness


@dataclass(frozen=True)
class Case:
    """One correctness case: x of `shape` with G groups, forced plan fields (None: the heuristic)."""

    name: str
    path: str
    shape: tuple
    G: int
    dtype: str
    layout: str = "contiguous"
    plan: tuple = ()  # (field, value) pairs for override_plan
    activation: str | None = None
    modulated: bool = False
    repeat: bool = False  # also check bitwise repeatability

    @property
    def epilogue(self) -> str:
        parts = (["scale_shift"] if self.modulated else []) + ([self.activation] if self.activation else [])
        return "+".join(parts) or "none"


CASE_DTYPES = {**DTYPES, "fp64": torch.float64}


def correctness_cases(rehearse: bool) -> list[Case]:
    """Every path x layout x dtype, every epilogue, odd sizes and repeatability, on small real-model
    shapes (tiny ones in rehearsal). Paths are forced with override_plan."""
    if rehearse:
        big, small, odd = (2, 16, 6, 5), (2, 16, 3, 3), (2, 12, 5, 3)
        paths = {"fused": dict(split=1, block_c=4, block_s=8), "groups": dict(split=1, groups_per_program=4),
                 "split": dict(split=3, block_s=8), "waves": dict(split=2, block_s=8, wave_blocks=3),
                 "heuristic": {}}  # fmt: skip
        dtypes = ["fp32", "bf16"]
    else:
        big, small, odd = (2, 320, 24, 24), (3, 64, 7, 9), (3, 60, 13, 11)
        paths = {"fused": dict(split=1), "groups": dict(split=1, groups_per_program=4), "split": dict(split=5),
                 "waves": dict(split=3, wave_blocks=7), "heuristic": {}}  # fmt: skip
        dtypes = ["bf16", "fp16", "fp32", "fp64"]
    G = 8 if rehearse else 32
    cases = []
    for layout in ("contiguous", "channels_last"):
        for dtype in dtypes:
            for path, plan in paths.items():
                shape = small if path == "groups" else big
                cases.append(Case(f"{path}-{layout}-{dtype}", path, shape, G, dtype, layout, tuple(plan.items())))
    for activation, modulated in ((None, True), ("silu", False), ("gelu", False), ("gelu_tanh", False),
                                  ("silu", True)):  # fmt: skip
        for path in ("fused",) if rehearse else ("fused", "split"):
            for dtype in ("bf16", "fp32"):
                case = Case("", path, big, G, dtype, "contiguous", tuple(paths[path].items()), activation, modulated)
                cases.append(dataclasses.replace(case, name=f"{path}-{dtype}-{case.epilogue}"))
    for layout in ("contiguous", "channels_last"):
        for dtype in ("fp32", "bf16", "fp64"):
            cases.append(Case(f"odd-{layout}-{dtype}", "heuristic", odd, 6 if not rehearse else 4, dtype, layout))
    for path in ("split", "waves"):
        cases.append(Case(f"repeat-{path}", path, big, G, "bf16", "channels_last", tuple(paths[path].items()),
                          "silu", True, repeat=True))  # fmt: skip
    return cases


def _case_inputs(case: Case, device: str) -> dict:
    """Fresh random inputs, mean-shifted (never zeros), in the case's layout."""
    dtype = CASE_DTYPES[case.dtype]
    N, C = case.shape[:2]
    x = (torch.randn(case.shape, dtype=torch.float64, device=device) * 2 + 3).to(dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    inputs = dict(x=x, weight=(1 + 0.5 * torch.randn(C, device=device)).to(dtype),
                  bias=torch.randn(C, device=device).to(dtype), dy=torch.randn_like(x))  # fmt: skip
    if case.modulated:
        inputs["scale"] = (0.3 * torch.randn(N, C, device=device)).to(dtype)
        inputs["shift"] = (0.3 * torch.randn(N, C, device=device)).to(dtype)
    return inputs


def _forward_backward(fn, case: Case, inputs: dict, dtype=None) -> dict:
    """Outputs and gradients of fn on fresh leaf copies of the inputs (cast to dtype if given)."""
    leaves = {k: (v.detach().clone() if dtype is None else v.detach().to(dtype)).requires_grad_()
              for k, v in inputs.items() if k != "dy"}  # fmt: skip
    y = fn(leaves["x"], case.G, leaves["weight"], leaves["bias"], 1e-5 if dtype is None else _ref_eps(inputs["x"]),
           activation=case.activation, scale=leaves.get("scale"), shift=leaves.get("shift"))  # fmt: skip
    y.backward(inputs["dy"].to(y.dtype))
    grads = {f"d{k}": v.grad for k, v in leaves.items()}
    return {"y": y.detach(), **grads}


def _ref_eps(x: torch.Tensor) -> float:
    # The kernels apply eps as an fp32 runtime scalar (documented): the reference uses the same value.
    return torch.tensor(1e-5, dtype=torch.float32).item() if x.dtype == torch.float64 else 1e-5


def _ours(case: Case, inputs: dict) -> dict:
    import gn_triton
    from gn_triton import _tuning

    with _tuning.override_plan(**dict(case.plan)) if case.plan else contextlib.nullcontext():
        return _forward_backward(gn_triton.group_norm, case, inputs)


def _torch_own(case: Case, inputs: dict) -> dict:
    """torch's own results at the input's dtype: the yardstick of the 16-bit tolerance."""
    import torch.nn.functional as F

    from gn_triton.functional import _torch_epilogue

    def torch_gn(x, G, w, b, eps, activation=None, scale=None, shift=None):
        return _torch_epilogue(F.group_norm(x, G, w, b, eps), activation, scale, shift)

    return _forward_backward(torch_gn, case, inputs)


def check_case(case: Case, device: str) -> list[dict]:
    """Rows: each output's error against the float64 reference and its tolerance (and bitwise
    repeatability when the case asks for it)."""
    from gn_triton.reference import TOLERANCE, group_norm_reference, relative_error

    inputs = _case_inputs(case, device)
    ours = _ours(case, inputs)
    ref = _forward_backward(group_norm_reference, case, inputs, dtype=torch.float64)
    dtype = CASE_DTYPES[case.dtype]
    torch_err = {}
    if dtype in (torch.float16, torch.bfloat16):
        theirs = _torch_own(case, inputs)
        torch_err = {k: relative_error(theirs[k], ref[k]) for k in ref}
    rows = []
    for name in ref:
        tol = TOLERANCE[dtype] + 2 * torch_err.get(name, 0.0)
        err = relative_error(ours[name], ref[name])
        rows.append(dict(output=name, error=err, tolerance=tol, status="ok" if err <= tol else "FAIL"))
    if case.repeat:
        again = _ours(case, inputs)
        same = all(torch.equal(ours[k], again[k]) for k in ours)
        rows.append(dict(output="bitwise_repeat", error=0.0 if same else 1.0, tolerance=0.0,
                         status="ok" if same else "FAIL"))  # fmt: skip
    return rows


def check_big_group(device: str) -> list[dict]:
    """A bf16 input of more than 2^31 elements in ONE group (G = 1), batch 1: int64 offsets and the
    group size past int32. The float64 reference is taken in chunks (the tensor is 4.3 GB)."""
    import gn_triton
    from gn_triton.reference import TOLERANCE

    C, L = 8, (1 << 28) + 3  # 2^31 + 24 elements
    x = torch.randn(1, C, L, device=device, dtype=torch.bfloat16).add_(3).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, device=device)).requires_grad_()
    b = torch.randn(C, device=device).requires_grad_()
    dy = torch.randn(1, C, L, device=device, dtype=torch.bfloat16)
    y = gn_triton.group_norm(x, 1, w, b)
    y.backward(dy)
    chunks = [(c, s, min(s + (1 << 26), L)) for c in range(C) for s in range(0, L, 1 << 26)]
    count = C * L
    mean = sum(x.detach()[0, c, s:e].double().sum() for c, s, e in chunks) / count
    var = sum(((x.detach()[0, c, s:e].double() - mean) ** 2).sum() for c, s, e in chunks) / count
    rstd = 1 / torch.sqrt(var + 1e-5)
    wd = w.detach().double()
    # dx = rstd*(gw - <gw> - x_hat*<gw*x_hat>), gw = dy*w[c]
    sum_gw = sum(dy[0, c, s:e].double().sum() * wd[c] for c, s, e in chunks)
    sum_gw_xhat = sum((dy[0, c, s:e].double() * (x.detach()[0, c, s:e].double() - mean)).sum() * wd[c] * rstd
                      for c, s, e in chunks)  # fmt: skip
    rows = []
    errors = {"y": 0.0, "dx": 0.0}
    for c, s, e in [(0, 0, 1 << 20), (C - 1, L - (1 << 20), L), (C // 2, L // 2, L // 2 + (1 << 20))]:
        xs = x.detach()[0, c, s:e].double()
        xhat = (xs - mean) * rstd
        y_ref = xhat * wd[c] + b.detach().double()[c]
        gw = dy[0, c, s:e].double() * wd[c]
        dx_ref = rstd * (gw - sum_gw / count - xhat * sum_gw_xhat / count)
        for name, out, ref in (("y", y.detach()[0, c, s:e], y_ref), ("dx", x.grad[0, c, s:e], dx_ref)):
            err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            errors[name] = max(errors[name], err if math.isfinite(err) else math.inf)
    tol = TOLERANCE[torch.bfloat16]  # bf16 outputs: their rounding dominates the sums' fp32 error
    for name, err in errors.items():
        rows.append(dict(output=name, error=err, tolerance=tol, status="ok" if err <= tol else "FAIL"))
    return rows


def stage_correctness(ev: Evidence, ctx: Context, clock: Clock) -> str:
    out = ev.rows("correctness.csv", CORRECTNESS_COLUMNS)
    checks = [(dict(case=c.name, path=c.path, layout=c.layout, dtype=c.dtype, epilogue=c.epilogue,
                    shape="x".join(map(str, c.shape)), G=c.G), lambda c=c: check_case(c, ctx.device))
              for c in correctness_cases(ctx.rehearse)]  # fmt: skip
    if ctx.device == "cuda":
        big = dict(case="big-group", path="heuristic", layout="contiguous", dtype="bf16", epilogue="none",
                   shape=f"1x8x{(1 << 28) + 3}", G=1)  # fmt: skip
        checks.append((big, lambda: check_big_group(ctx.device)))
    failed = done = 0
    for base, check in checks:
        if clock.expired():
            break
        start = time.monotonic()
        try:
            rows = check()
        except Exception as exc:  # a crash is a result to bring back, not the end of the run
            rows = [dict(output="all", status=f"error: {type(exc).__name__}: {str(exc)[:300]}")]
        for row in rows:
            out.write(dict(base, **row, seconds=round(time.monotonic() - start, 2)))
        failed += any(r["status"] != "ok" for r in rows)
        done += 1
        _free(ctx)
    return f"{done} cases, {failed} with a failure"


def warm_correctness(ctx: Context) -> list[Callable]:
    return [lambda case=case: _ours(case, _case_inputs(case, ctx.device)) for case in correctness_cases(False)]


# ---------------------------------------------------------------------------------------------
# Stages 3 and 8: throughput rows in the sweep's schema


def core_points(rehearse: bool) -> list[Point]:
    from .suites import FUNCTIONAL_SUITES

    shapes = FUNCTIONAL_SUITES["tiny"][:2] if rehearse else SUITES["sd_vae"] + SUITES["sd_unet"]
    batches = (1, 2) if rehearse else (1, 4, 16, 32)
    return [Point(s, N, mode, "bf16" if not rehearse else "fp32", layout)
            for layout in ("contiguous", "channels_last") for s in shapes for N in batches
            for mode in ("fwd", "bwd")]  # fmt: skip


def broad_points(rehearse: bool) -> list[Point]:
    from .suites import FUNCTIONAL_SUITES

    if rehearse:
        return [Point(FUNCTIONAL_SUITES["tiny"][2], 2, "fwd"), Point(FUNCTIONAL_SUITES["tiny"][0], 1, "fwd",
                                                                      activation="silu")]  # fmt: skip
    others = [s for name in ("resnet50_gn", "mask_rcnn_head", "video_vae", "llm_3d") for s in SUITES[name]]
    sd = SUITES["sd_vae"] + SUITES["sd_unet"]
    points = [Point(s, N, m, "bf16", lay) for lay in ("contiguous", "channels_last") for s in others
              for N in (1, 8, 32) for m in ("fwd", "bwd") if lay == "contiguous" or len(s.spatial) >= 2]  # fmt: skip
    points += [Point(s, N, m, "bf16", "contiguous", "silu") for s in sd for N in (1, 8) for m in ("fwd", "bwd")]
    points += [Point(s, N, m, dt) for dt in ("fp16", "fp32") for s in sd for N in (1, 8) for m in ("fwd", "bwd")]
    return points


_PROVIDERS: dict = {}


def _providers(ctx: Context, activation: str | None) -> list:
    from .providers import providers

    if activation not in _PROVIDERS:
        names = ["gn_triton", "torch_eager", "torch_compile"]
        _PROVIDERS[activation] = providers(names, functional=ctx.rehearse, activation=activation)
    return _PROVIDERS[activation]


def measure_points(ev: Evidence, ctx: Context, clock: Clock, stage: str, points: list[Point]) -> str:
    """perf.measure's runner over the points, rows to sweep.csv as measured; gn_triton runs its
    heuristic plan (the autotuner's picks are stage 4's business)."""
    run = dict(ctx.run, stage=stage)
    with _autotune(False):
        timed = run_points(points, lambda activation: _providers(ctx, activation), ev.rows("sweep.csv", COLUMNS),
                           run, ctx.timer, ctx.copy_gbps, expired=clock.expired)  # fmt: skip
    return f"{timed} provider measurements"


def stage_core(ev: Evidence, ctx: Context, clock: Clock) -> str:
    return measure_points(ev, ctx, clock, "core", core_points(ctx.rehearse))


def stage_broad(ev: Evidence, ctx: Context, clock: Clock) -> str:
    return measure_points(ev, ctx, clock, "broad", broad_points(ctx.rehearse))


def _warm_points(ctx: Context, points: list[Point]) -> list[Callable]:
    """gn_triton's and torch.compile's first calls at each point (the compilations)."""

    def warm(point: Point) -> None:
        inputs = make_inputs(point.shape, point.N, DTYPES[point.dtype], point.layout, ctx.device, 1)
        if inputs is None:
            return
        with _autotune(False):
            for prov in _providers(ctx, point.activation):
                if prov.name in ("gn_triton", "torch_compile") and not prov.unsupported(inputs[0][0]):
                    make_call(prov, inputs, point.shape.G, point.mode)()

    return [lambda p=p: warm(p) for p in points]


# ---------------------------------------------------------------------------------------------
# Stage 4: plan calibration


def calibration_problems(rehearse: bool) -> list[tuple[Shape, int, str, str]]:
    """(shape, N, direction, layout): the regimes of the planner (split waves at batch 1, fused at
    batch 32, tiny-row U-Net shapes, channels_last)."""
    if rehearse:
        tiny = Shape("tiny", 8, (8, 8), 4)
        return [(tiny, 1, "fwd", "contiguous"), (tiny, 2, "bwd", "channels_last")]
    vae, unet = SUITES["sd_vae"], SUITES["sd_unet"]
    problems = [(vae[3], 1), (unet[0], 32), (vae[0], 1), (unet[3], 4), (vae[2], 4)]
    out = [(s, n, d, "contiguous") for s, n in problems for d in ("fwd", "bwd")]
    return out + [(vae[3], 1, "fwd", "channels_last"), (vae[3], 1, "bwd", "channels_last")]


MAX_CANDIDATES = 16


def _calibration_runs(ctx: Context, shape: Shape, N: int, direction: str, layout: str):
    """(problem, plans, call(plan or None)): the planner's candidates for this problem and a callable that
    runs one call of the direction with a forced plan (None: whatever the planner picks)."""
    import gn_triton
    from gn_triton import _tuning
    from gn_triton._tuning import Problem

    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    (x, w, b, dy), *_ = make_inputs(shape, N, dtype, layout, ctx.device, 1)
    problem = Problem(N, shape.C, math.prod(shape.spatial), shape.G, dtype, layout == "channels_last", True, True)
    device = torch.device(ctx.device)
    plans = _tuning.candidate_plans(direction, problem, device)[: MAX_CANDIDATES if not ctx.rehearse else 3]
    y = None if direction == "fwd" else gn_triton.group_norm(x, shape.G, w, b)

    def call(plan):
        forced = _tuning.override_plan(**dataclasses.asdict(plan)) if plan else contextlib.nullcontext()
        with forced:
            if direction == "fwd":
                with torch.no_grad():
                    gn_triton.group_norm(x, shape.G, w, b)
            else:
                x.grad = w.grad = b.grad = None
                y.backward(dy, retain_graph=True)

    return problem, plans, call


def stage_calibration(ev: Evidence, ctx: Context, clock: Clock) -> str:
    out = ev.rows("calibration.csv", CALIBRATION_COLUMNS)
    timed = 0
    for shape, N, direction, layout in calibration_problems(ctx.rehearse):
        if clock.expired():
            break
        timed += calibrate(ctx, clock, out, shape, N, direction, layout)
        _free(ctx)
    return f"{timed} plans timed"


def calibrate(ctx: Context, clock: Clock, out: RowFile, shape: Shape, N: int, direction: str, layout: str) -> int:
    """Rows for one problem: the heuristic plan, then the other candidates, then (GPU) the autotuner's
    own pick over all its candidates, timed as it runs. Returns the number of plans timed."""
    from gn_triton import _tuning

    with _autotune(False):
        problem, plans, call = _calibration_runs(ctx, shape, N, direction, layout)
    nbytes = floor_bytes(direction, N * shape.C * problem.S, problem.elem_size)
    base = dict(problem=shape.label, N=N, direction=direction, dtype=str(problem.dtype).replace("torch.", ""),
                layout=layout, floor_bytes=nbytes)  # fmt: skip
    device = torch.device(ctx.device)
    heuristic = _tuning.heuristic_plan(direction, problem, device).fit(problem)
    runs = [("heuristic", heuristic)] + [("candidate", p) for p in plans if p.fit(problem) != heuristic]
    timed = 0
    for role, plan in runs:
        if clock.expired():
            return timed
        with _autotune(False):
            out.write(_time_plan(ctx, dict(base, role=role), problem, plan, call))
        timed += 1
    if ctx.device != "cuda":
        return timed
    everything = len(_tuning.candidate_plans(direction, problem, device))
    if clock.left() < 0.5 * everything:
        out.write(dict(base, role="autotuner", status=f"skipped: {everything} candidates exceed the time box"))
        return timed
    with _autotune(True):
        _tuning._tuned.clear()
        first = _timed(ctx, lambda: call(None))
        tuned = next(iter(_tuning._tuned.values()), None)
        row = _time_plan(ctx, dict(base, role="autotuner"), problem, tuned, lambda plan: call(None))
    out.write(dict(row, first_call_s=round(first, 3)))
    return timed + 1


def _time_plan(ctx: Context, row: dict, problem, plan, call) -> dict:
    """Time one plan; the row carries the cost model's prediction beside the measurement."""
    from gn_triton import _cost, _tuning

    if plan is None:
        return dict(row, status="error: no plan")
    plan = plan.fit(problem)
    predicted = _cost.predict(row["direction"], problem, plan, _tuning._device(torch.device(ctx.device)))
    row = dict(row, **{k: getattr(plan, k) for k in ("split", "groups_per_program", "block_c", "block_s",
                                                      "num_warps", "wave_blocks")},
               programs=predicted.programs, launches=predicted.launches, predicted_ms=predicted.time_us / 1e3,
               predicted_traffic=predicted.traffic_over_floor)  # fmt: skip
    try:
        first = _timed(ctx, lambda: call(plan))
        ms = ctx.timer(lambda: call(plan), graph=False)[0]
    except Exception as exc:  # a plan that does not compile or run here is a finding
        return dict(row, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
    gbps = row["floor_bytes"] / ms / 1e6
    return dict(row, status="ok", ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / ctx.copy_gbps, first_call_s=first)


def warm_calibration(ctx: Context) -> list[Callable]:
    def warm(problem_args) -> None:
        with _autotune(False):
            problem, plans, call = _calibration_runs(ctx, *problem_args)
            for plan in plans:
                with contextlib.suppress(Exception):
                    call(plan)

    return [lambda a=a: warm(a) for a in calibration_problems(False)]


# ---------------------------------------------------------------------------------------------
# Stage 5: DRAM traffic (ncu)

TRAFFIC_CASES = [(SUITES["sd_vae"][3], 1), (SUITES["sd_unet"][0], 32)]
NCU_METRICS = "dram__bytes_read.sum,dram__bytes_write.sum"


def _traffic_plans(shape: Shape, N: int) -> dict[str, dict]:
    """The forced plans compared: fused (one launch, the second read from L1/L2 if resident blocks
    fit) and split in L2-sized waves."""
    from gn_triton import _tuning
    from gn_triton._tuning import Problem

    p = Problem(N, shape.C, math.prod(shape.spatial), shape.G, torch.bfloat16, False, True, True)
    sms, l2_bytes = _tuning.device_info(torch.device("cuda"))
    wave = _tuning._wave_blocks("bwd", p, 1, l2_bytes)
    return {"fused": dict(split=1), "split_waves": dict(split=max(2, -(-4 * sms // (wave or p.blocks(1)))),
                                                        wave_blocks=wave)}  # fmt: skip


def ncu_case(shape_index: int, path: str) -> None:
    """Run inside ncu: one forward and one backward with a forced plan, inside the NVTX range 'gn'
    (compilation and warm-up outside it)."""
    import gn_triton
    from gn_triton import _tuning

    shape, N = TRAFFIC_CASES[shape_index]
    x = torch.randn(shape.full(N), device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(shape.C, device="cuda", requires_grad=True)
    b = torch.randn(shape.C, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with _tuning.override_plan(**_traffic_plans(shape, N)[path]):
        gn_triton.group_norm(x, shape.G, w, b).backward(dy)  # compile, warm up
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range("gn"):
            gn_triton.group_norm(x, shape.G, w, b).backward(dy)
        torch.cuda.synchronize()


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --print-units base rows: kernel name, metric name, value in bytes."""
    import csv
    import io

    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        if rec.get("Metric Name") in NCU_METRICS.split(","):
            scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(rec.get("Metric Unit", "byte"), 1)
            value = float(rec["Metric Value"].replace(",", "")) * scale
            rows.append(dict(kernel=rec["Kernel Name"], metric=rec["Metric Name"], bytes=value))
    return rows


def stage_traffic(ev: Evidence, ctx: Context, clock: Clock) -> str:
    out = ev.rows("traffic.csv", TRAFFIC_COLUMNS)
    ncu = shutil.which("ncu")
    if ctx.device != "cuda" or ncu is None:
        why = "rehearsal: no GPU" if ctx.device != "cuda" else "ncu not found"
        out.write(dict(shape="-", status=f"skipped: {why}"))
        return f"skipped ({why})"
    done = 0
    for index, (shape, N) in enumerate(TRAFFIC_CASES):
        for path in _traffic_plans(shape, N):
            if clock.left() < 10:
                clock.hit = True
                return f"{done} profiles"
            cmd = [ncu, "--clock-control", "none", "--metrics", NCU_METRICS, "--csv", "--print-units", "base",
                   "--nvtx", "--nvtx-include", "gn/", sys.executable, "-m", "perf.gpu_evidence", "--ncu-case",
                   str(index), path]  # fmt: skip
            base = dict(shape=shape.label, N=N, dtype="bf16", path=path)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=clock.left())
                rows = parse_ncu_csv(proc.stdout)
                if not rows:
                    raise RuntimeError(f"no ncu rows (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-300:]}")
            except Exception as exc:
                out.write(dict(base, status=f"error: {type(exc).__name__}: {str(exc)[:300]}"))
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


# ---------------------------------------------------------------------------------------------
# Stages 6 and 7: subprocesses with a time limit


def _subprocess_stage(ev: Evidence, clock: Clock, cmd: list[str], log_name: str | None, env=None) -> str:
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
        (ev.out / log_name).write_text(f"$ {' '.join(cmd)}\n{text}\n[{status}]\n")
    ev.log(f"  {' '.join(Path(c).name for c in cmd[:3])} ...: {status}; last line: {text.strip()[-200:]!r}")
    return status


def stage_sanitizer(ev: Evidence, ctx: Context, clock: Clock) -> str:
    case = [sys.executable, str(Path(__file__).parent / "sanitize_case.py")]
    if ctx.device != "cuda":  # rehearsal: the case itself, in the interpreter
        return "rehearsal (no compute-sanitizer): " + _subprocess_stage(
            ev, clock, case + ["--device", "cpu"], "sanitizer.txt", dict(os.environ, TRITON_INTERPRET="1")
        )
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        (ev.out / "sanitizer.txt").write_text("compute-sanitizer not found\n")
        return "skipped: compute-sanitizer not found"
    return _subprocess_stage(ev, clock, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *case],
                             "sanitizer.txt")  # fmt: skip


def stage_models(ev: Evidence, ctx: Context, clock: Clock) -> str:
    if ctx.device != "cuda":
        return "skipped: rehearsal (model_bench needs a GPU)"
    # Batch 1 only: each compiled provider compiles a whole U-Net and VAE forward+backward (minutes on a
    # bare machine); model_bench rewrites its CSV after every model and batch, so a kill keeps the rest.
    cmd = [sys.executable, "-m", "perf.model_bench", "--out", str(ev.out), "--batch", "1"]
    return _subprocess_stage(ev, clock, cmd, None)


# ---------------------------------------------------------------------------------------------
# Parallel warm-up: compile a stage's kernels on many cores into Triton's on-disk cache


WARMERS = {"correctness": warm_correctness, "core": lambda ctx: _warm_points(ctx, core_points(False)),
           "calibration": warm_calibration, "broad": lambda ctx: _warm_points(ctx, broad_points(False))}  # fmt: skip


def warm_stage(ev: Evidence, stage: str, seconds: float) -> str:
    """Run the stage's warm-up cases in worker processes (each takes every W-th case), for at most
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
    ev.log("  " + summary + "; " + " | ".join(o.strip().splitlines()[-1] if o.strip() else "-" for o in outputs))
    return summary


def warm_worker(stage: str, worker: int, workers: int) -> int:
    """One warm-up worker: every workers-th case of the stage, from the worker-th; an error (or out
    of memory in its share of the GPU) only skips that case."""
    torch.cuda.set_per_process_memory_fraction(0.9 / workers)
    ctx = Context("cuda", rehearse=False, rep_ms=0)
    cases = WARMERS[stage](ctx)[worker::workers]
    failed = 0
    for case in cases:
        try:
            case()
        except Exception:
            failed += 1
        torch.cuda.empty_cache()
    print(f"worker {worker}: {len(cases)} cases, {failed} failed")
    return 0


# ---------------------------------------------------------------------------------------------
# Driver

STAGES = [
    Stage("env", 0.04, stage_env),
    Stage("correctness", 0.18, stage_correctness, warm=True),
    Stage("core", 0.34, stage_core, warm=True),
    Stage("calibration", 0.12, stage_calibration, warm=True),
    Stage("traffic", 0.07, stage_traffic),
    Stage("sanitizer", 0.07, stage_sanitizer),
    Stage("models", 0.12, stage_models),
    Stage("broad", 0.06, stage_broad, warm=True),
]


def run_stages(ev: Evidence, ctx: Context, budget_s: float, kill_after: int | None) -> None:
    min_stage_s = 1.0 if ctx.rehearse else 8.0
    carry = 0.0
    last_done = 0
    for k, stage in enumerate(STAGES, 1):
        record = dict(stage=k, name=stage.name, status="not run: budget")
        ev.run["stages"].append(record)
        if ev.left() < min_stage_s:
            continue
        start = time.monotonic()
        clock = Clock(min(ev.deadline, start + stage.share * budget_s + carry))
        record.update(status="running", started=_now())
        ev.save()
        ev.log(f"stage {k} {stage.name}: start ({clock.left():.0f} s box)")
        try:
            if stage.warm and not ctx.rehearse:
                _free(ctx)  # the workers share the GPU's memory
                record["warm_up"] = warm_stage(ev, stage.name, 0.5 * clock.left())
            record["note"] = stage.run(ev, ctx, clock)
            record["status"] = "stopped at its time box" if clock.hit else "done"
        except Exception as exc:
            record["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
            ev.log(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - start, 1)
        ev.log(f"stage {k} {stage.name}: {record['status']} in {record['seconds']} s; {record.get('note', '')}")
        ev.save()
        last_done = k
        carry = max(0.0, clock.deadline - time.monotonic())
        if kill_after == k:  # tests: a run killed here must have everything so far on disk
            os.kill(os.getpid(), signal.SIGKILL)
    if last_done < len(STAGES):
        ev.run["result"] = f"stopped at budget after stage {last_done}"
    else:
        ev.run["result"] = "all stages run"
    ev.log(ev.run["result"])
    ev.save()


def check_output_folder(out: Path) -> list[str]:
    """What the device tool would not bring back: more than MAX_FILES files, sub-folders, odd names."""
    problems = []
    files = [p for p in out.iterdir() if not p.name.startswith(".")]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back)")
    problems += [f"{p.name}: not a plain file" for p in files if not p.is_file()]
    problems += [f"{p.name}: name has characters other than letters, digits, . _ -" for p in files
                 if not FILE_NAME.match(p.name)]  # fmt: skip
    return problems


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (the device tool's $OUT)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all stages (default 480)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal: interpreter, tiny shapes")
    p.add_argument("--rep-ms", type=int, default=40, help="GPU timing window per measurement (ms)")
    p.add_argument("--kill-after-stage", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL itself
    p.add_argument("--warm", help=argparse.SUPPRESS)  # internal: a warm-up worker of this stage
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ncu-case", nargs=2, help=argparse.SUPPRESS)  # internal: the case ncu profiles
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warm:
        return warm_worker(args.warm, args.worker, args.workers)
    if args.ncu_case:
        ncu_case(int(args.ncu_case[0]), args.ncu_case[1])
        return 0
    if args.out is None:
        raise SystemExit("--out DIR is required")
    rehearse = args.rehearse or not torch.cuda.is_available()
    if rehearse:
        os.environ["TRITON_INTERPRET"] = "1"  # before gn_triton is imported
    ev = Evidence(args.out, args.budget_s, {k: v for k, v in vars(args).items() if v is not None})
    ev.log(("REHEARSAL on the CPU (Triton's interpreter, tiny shapes): not performance evidence. "
            if rehearse else "") + f"budget {args.budget_s:.0f} s, output {args.out}")  # fmt: skip
    ctx = Context("cpu" if rehearse else "cuda", rehearse, args.rep_ms)
    run_stages(ev, ctx, args.budget_s, args.kill_after_stage)
    for problem in check_output_folder(args.out):
        ev.log(f"WARNING: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
