"""Stages 3 and 8: throughput rows in the sweep's schema (sweep.csv), through perf.measure's runner.
Stage 3 (core): the SD VAE and U-Net shapes at batch 1/4/16/32, forward and backward, bf16, both
layouts, gn_triton against torch eager and torch.compile. Stage 8 (broad): the other suites, the fused
SiLU and fp16/fp32, row by row until the budget ends."""

from __future__ import annotations

from collections.abc import Callable

from ..measure import DTYPES, Point, make_call, make_inputs, run_points
from ..rows import COLUMNS
from ..suites import FUNCTIONAL_SUITES, SUITES
from .job import Clock, Context, Job, autotune

PROVIDERS = ["gn_triton", "torch_eager", "torch_compile"]
_providers: dict = {}


def core_points(rehearse: bool) -> list[Point]:
    shapes = FUNCTIONAL_SUITES["tiny"][:2] if rehearse else SUITES["sd_vae"] + SUITES["sd_unet"]
    batches = (1, 2) if rehearse else (1, 4, 16, 32)
    return [Point(s, N, mode, "bf16" if not rehearse else "fp32", layout)
            for layout in ("contiguous", "channels_last") for s in shapes for N in batches
            for mode in ("fwd", "bwd")]  # fmt: skip


def broad_points(rehearse: bool) -> list[Point]:
    if rehearse:
        tiny = FUNCTIONAL_SUITES["tiny"]
        return [Point(tiny[2], 2, "fwd"), Point(tiny[0], 1, "fwd", activation="silu")]
    others = [s for name in ("resnet50_gn", "mask_rcnn_head", "video_vae", "llm_3d") for s in SUITES[name]]
    sd = SUITES["sd_vae"] + SUITES["sd_unet"]
    points = [Point(s, N, m, "bf16", lay) for lay in ("contiguous", "channels_last") for s in others
              for N in (1, 8, 32) for m in ("fwd", "bwd") if lay == "contiguous" or len(s.spatial) >= 2]  # fmt: skip
    points += [Point(s, N, m, "bf16", "contiguous", "silu") for s in sd for N in (1, 8) for m in ("fwd", "bwd")]
    points += [Point(s, N, m, dt) for dt in ("fp16", "fp32") for s in sd for N in (1, 8) for m in ("fwd", "bwd")]
    return points


def providers(ctx: Context, activation: str | None) -> list:
    from ..providers import providers as make

    if activation not in _providers:
        _providers[activation] = make(PROVIDERS, functional=ctx.rehearse, activation=activation)
    return _providers[activation]


def measure_points(job: Job, ctx: Context, clock: Clock, stage: str, points: list[Point]) -> str:
    """perf.measure's runner over the points, rows to sweep.csv as measured; gn_triton runs its
    heuristic plan (the autotuner's picks are the calibration stage's business)."""
    with autotune(False):
        timed = run_points(points, lambda activation: providers(ctx, activation), job.rows("sweep.csv", COLUMNS),
                           dict(ctx.run, stage=stage), ctx.timer, ctx.copy_gbps, expired=clock.expired)  # fmt: skip
    return f"{timed} provider measurements"


def stage_core(job: Job, ctx: Context, clock: Clock) -> str:
    return measure_points(job, ctx, clock, "core", core_points(ctx.rehearse))


def stage_broad(job: Job, ctx: Context, clock: Clock) -> str:
    return measure_points(job, ctx, clock, "broad", broad_points(ctx.rehearse))


def warm_points(ctx: Context, points: list[Point]) -> list[Callable]:
    """gn_triton's and torch.compile's first calls at each point (the compilations)."""

    def warm(point: Point) -> None:
        inputs = make_inputs(point.shape, point.N, DTYPES[point.dtype], point.layout, ctx.device, 1)
        if inputs is None:
            return
        with autotune(False):
            for prov in providers(ctx, point.activation):
                if prov.name in ("gn_triton", "torch_compile") and not prov.unsupported(inputs[0][0]):
                    make_call(prov, inputs, point.shape.G, point.mode)()

    return [lambda p=p: warm(p) for p in points]


def warm_core(ctx: Context) -> list[Callable]:
    return warm_points(ctx, core_points(False))


def warm_broad(ctx: Context) -> list[Callable]:
    return warm_points(ctx, broad_points(False))
