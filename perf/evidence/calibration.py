"""Stage 4: plan calibration. For a few problems (the planner's regimes: split waves at batch 1,
fused at batch 32, tiny-row U-Net shapes, channels_last) it times every candidate plan (bounded)
beside the cost model's prediction, then the heuristic's and the autotuner's pick: the data that
calibrates gn_triton/_cost.py and checks the planner's choices (perf.ingest summarises it)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch

from ..measure import make_inputs
from ..rows import RowFile
from ..suites import SUITES, Shape
from .job import Clock, Context, Job, autotune, error_status

COLUMNS = ["problem", "N", "direction", "dtype", "layout", "role", "split", "groups_per_program", "block_c",
           "block_s", "num_warps", "wave_blocks", "chunks", "programs", "launches", "floor_bytes", "predicted_ms",
           "predicted_traffic", "status", "ms", "gbps", "pct_copy_bw", "first_call_s"]  # fmt: skip
MAX_CANDIDATES = 16


def problems(rehearse: bool) -> list[tuple[Shape, int, str, str]]:
    """(shape, N, direction, layout) of each calibration problem."""
    if rehearse:
        tiny = Shape("tiny", 8, (8, 8), 4)
        return [(tiny, 1, "fwd", "contiguous"), (tiny, 2, "bwd", "channels_last")]
    vae, unet = SUITES["sd_vae"], SUITES["sd_unet"]
    chosen = [(vae[3], 1), (unet[0], 32), (vae[0], 1), (unet[3], 4), (vae[2], 4)]
    out = [(s, n, d, "contiguous") for s, n in chosen for d in ("fwd", "bwd")]
    return out + [(vae[3], 1, "fwd", "channels_last"), (vae[3], 1, "bwd", "channels_last")]


def _runs(ctx: Context, shape: Shape, N: int, direction: str, layout: str):
    """(problem, plans, call(plan or None)): the planner's candidates for this problem and a callable that
    runs one call of the direction with a forced plan (None: whatever the planner picks)."""
    import gn_triton
    from gn_triton import _tuning
    from gn_triton._tuning import Problem

    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    (x, w, b, dy), *_ = make_inputs(shape, N, dtype, layout, ctx.device, 1)
    problem = Problem(N=N, C=shape.C, S=math.prod(shape.spatial), G=shape.G, dtype=dtype,
                      channels_last=layout == "channels_last", has_weight=True, has_bias=True)  # fmt: skip
    plans = _tuning.candidate_plans(direction, problem, torch.device(ctx.device))
    plans = plans[: MAX_CANDIDATES if not ctx.rehearse else 3]
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


def stage_calibration(job: Job, ctx: Context, clock: Clock) -> str:
    out = job.rows("calibration.csv", COLUMNS)
    timed = 0
    for shape, N, direction, layout in problems(ctx.rehearse):
        if clock.expired():
            break
        timed += calibrate(ctx, clock, out, shape, N, direction, layout)
        ctx.free()
    return f"{timed} plans timed"


def calibrate(ctx: Context, clock: Clock, out: RowFile, shape: Shape, N: int, direction: str, layout: str) -> int:
    """Rows for one problem: the heuristic plan, then the other candidates, then (GPU) the autotuner's
    own pick over all its candidates, timed as it runs. Returns the number of plans timed."""
    from gn_triton import _tuning
    from gn_triton._cost import floor_bytes

    with autotune(False):
        problem, plans, call = _runs(ctx, shape, N, direction, layout)
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
        with autotune(False):
            out.write(time_plan(ctx, dict(base, role=role), problem, plan, call))
        timed += 1
    if ctx.device != "cuda":
        return timed
    everything = len(_tuning.candidate_plans(direction, problem, device))
    if clock.left() < 0.5 * everything:
        out.write(dict(base, role="autotuner", status=f"skipped: {everything} candidates exceed the time box"))
        return timed
    with autotune(True):
        _tuning._tuned.clear()
        first = ctx.timed(lambda: call(None))
        tuned = next(iter(_tuning._tuned.values()), None)
        row = time_plan(ctx, dict(base, role="autotuner"), problem, tuned, lambda plan: call(None))
    out.write(dict(row, first_call_s=round(first, 3)))
    return timed + 1


def time_plan(ctx: Context, row: dict, problem, plan, call: Callable) -> dict:
    """One calibration row: the plan's fields, the model's prediction and the measured time."""
    from gn_triton import _cost, _tuning

    if plan is None:
        return dict(row, status="error: no plan")
    plan = plan.fit(problem)
    pred = _cost.predict(row["direction"], problem, plan, _tuning._device(torch.device(ctx.device)))
    row = dict(row, **dataclasses.asdict(plan), programs=pred.programs, launches=pred.launches,
               predicted_ms=pred.time_us / 1e3, predicted_traffic=pred.traffic_over_floor)  # fmt: skip
    try:
        first = ctx.timed(lambda: call(plan))
        ms = ctx.timer(lambda: call(plan), graph=False)[0]
    except Exception as exc:  # a plan that does not compile or run on this GPU is a finding
        return dict(row, status=error_status(exc, 200))
    gbps = row["floor_bytes"] / ms / 1e6
    return dict(row, status="ok", ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / ctx.copy_gbps, first_call_s=first)


def warm_calibration(ctx: Context) -> list[Callable]:
    def warm(problem_args) -> None:
        with autotune(False):
            problem, plans, call = _runs(ctx, *problem_args)
            for plan in plans:
                with contextlib.suppress(Exception):
                    call(plan)

    return [lambda a=a: warm(a) for a in problems(False)]
