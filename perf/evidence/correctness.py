"""Stage 2: correctness on the GPU, with the test suite's own cases and comparison: the named shapes,
forced plans, dtypes, layouts, epilogues and affine combinations of tests/cases.py, each checked by
tests/gn_testing.py's assert_matches_reference (every output and gradient against the float64
reference, 16-bit tolerance from torch's own error), so the GPU run checks what CI checks. On top:
model-sized shapes on the GPU's own plans, gn_triton.distributed's steps on shards (in one process),
bitwise repeatability, and one input of more than 2^31 elements in a single group."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .job import Clock, Context, Job, error_status

TESTS = Path(__file__).resolve().parents[2] / "tests"
COLUMNS = ["case", "plan", "layout", "dtype", "epilogue", "affine", "shape", "G", "status", "seconds"]
# Beyond the suite's tiny shapes: sizes where a GPU's heuristic picks its real tiles and paths.
MODEL_SIZED = {"SD U-Net-like 2x320x24x24": ((2, 320, 24, 24), 32), "odd 3x60x13x11, C/G=10": ((3, 60, 13, 11), 6)}


def suite():
    """The test suite's case table and comparison (tests/ is plain modules beside this package)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import cases
    import gn_testing

    return cases, gn_testing


@dataclass(frozen=True)
class Case:
    """One check: x of `size` with `groups` groups, a plan of cases.PLANS, an epilogue, an affine."""

    name: str
    plan: str
    size: tuple
    groups: int
    dtype: torch.dtype
    layout: str = "contiguous"
    activation: str | None = None
    modulation: str | None = None  # a cases.MODULATIONS name
    affine: str = "weight+bias"  # a cases.AFFINE name
    repeat: bool = False  # also check bitwise repeatability
    shards: bool = False  # gn_triton.distributed's steps on 3 shards along dim 2 (one empty), in one process

    @property
    def epilogue(self) -> str:
        return "+".join(p for p in (self.modulation, self.activation) if p) or "none"

    def columns(self) -> dict:
        dtype = str(self.dtype).replace("torch.", "")
        return dict(case=self.name, plan=self.plan, layout=self.layout, dtype=dtype, epilogue=self.epilogue,
                    affine=self.affine, shape="x".join(map(str, self.size)), G=self.groups)  # fmt: skip


def _layouts(size: tuple) -> tuple[str, ...]:
    return ("contiguous", "channels_last") if len(size) in (4, 5) else ("contiguous",)


def correctness_cases(rehearse: bool) -> list[Case]:
    """Every plan x layout x dtype on the suite's named shapes, then epilogues, affine combinations,
    model-sized shapes, shards and repeatability (a few of each in the CPU rehearsal)."""
    cases, _ = suite()
    plans = ["heuristic", *cases.PATHS]
    nchw = cases.SHAPES["nchw"]
    if rehearse:  # the machinery on a few cases: each plan and layout, each activation and modulation once
        fused, waves = "fused, 4 groups per program", "split 2, waves of 3 blocks"
        out = [Case("nchw", plan, *nchw, torch.float32) for plan in plans]
        out += [Case("nchw", plan, *nchw, torch.float32, "channels_last") for plan in (fused, waves)]
        epilogues = [(None, "scale+shift"), ("silu", None), ("gelu", "scale"), ("gelu_tanh", "shift")]
        out += [Case("nchw", fused, *nchw, torch.bfloat16, activation=a, modulation=m) for a, m in epilogues]
        out += [Case("shards", waves, *nchw, torch.float32, "channels_last", "silu", "scale+shift", shards=True)]
        return out + [Case("repeat", waves, *nchw, torch.bfloat16, "channels_last", "silu", "scale+shift", repeat=True)]
    out = [Case(name, plan, size, G, dtype, layout) for name, (size, G) in cases.SHAPES.items()
           for layout in _layouts(size) for dtype in cases.DTYPES for plan in plans]  # fmt: skip
    epilogues = [(a, m) for a in (None, *cases.ACTIVATIONS) for m in (None, *cases.MODULATIONS) if a or m]
    for plan in cases.FUSED_AND_SPLIT:
        for dtype in (torch.float32, torch.bfloat16):
            out += [Case("nchw", plan, *nchw, dtype, activation=a, modulation=m) for a, m in epilogues]
            out += [Case("nchw", plan, *nchw, dtype, affine=a) for a in cases.AFFINE if a != "weight+bias"]
    out += [Case(name, plan, size, G, dtype, layout) for name, (size, G) in MODEL_SIZED.items()
            for layout in _layouts(size) for dtype in cases.DTYPES
            for plan in ("heuristic", *cases.FUSED_AND_SPLIT_LONG_ROWS)]  # fmt: skip
    size, G = MODEL_SIZED["SD U-Net-like 2x320x24x24"]
    out += [Case("shards", plan, size, G, dtype, layout, "silu", "scale+shift", shards=True)
            for plan in ("heuristic", *cases.FUSED_AND_SPLIT) for dtype in (torch.float32, torch.bfloat16)
            for layout in _layouts(size)]  # fmt: skip
    out += [Case("repeat", plan, size, G, torch.bfloat16, "channels_last", "silu", "scale+shift", repeat=True)
            for plan in cases.FUSED_AND_SPLIT]  # fmt: skip
    return out


def inputs(case: Case, device: str) -> tuple:
    """(x, weight, bias, dy, epilogue): fresh random, mean-shifted inputs as the suite makes them."""
    cases, t = suite()
    N, C = case.size[:2]
    x = t.make_input(case.size, case.dtype, device, offset=3.0, layout=case.layout)
    w, b = t.make_params(C, case.dtype, device, **cases.AFFINE[case.affine])
    epilogue = {"activation": case.activation} if case.activation else {}
    if case.modulation:
        epilogue["scale"], epilogue["shift"] = t.make_modulation(N, C, case.dtype, device,
                                                                 **cases.MODULATIONS[case.modulation])  # fmt: skip
    dy = torch.randn(case.size, dtype=torch.float64, device=device).to(case.dtype)
    return x, w, b, dy, epilogue


def run_ours(case: Case, device: str) -> tuple:
    """gn_triton's outputs and gradients on the case's plan (also the warm-up's compilations)."""
    import gn_triton

    _, t = suite()
    x, w, b, dy, epilogue = inputs(case, device)
    with t.forced(case.plan):
        return t.forward_backward(gn_triton.group_norm, x, case.groups, w, b, dy, **epilogue)


def check_case(case: Case, device: str) -> str:
    """'ok', or the suite's assertion message."""
    import gn_triton

    _, t = suite()
    x, w, b, dy, epilogue = inputs(case, device)
    height = case.size[2]
    fn = t.sharded(2, [height // 3, 0, height - height // 3]) if case.shards else None
    try:
        with t.forced(case.plan):
            ours = t.assert_matches_reference(x, case.groups, w, b, dy, fn=fn, **epilogue)
            if case.repeat:
                again = t.forward_backward(gn_triton.group_norm, x, case.groups, w, b, dy, **epilogue)
                assert all(a is None or torch.equal(a, o) for a, o in zip(again, ours)), "not bitwise repeatable"
    except AssertionError as exc:
        return f"FAIL: {str(exc)[:300]}"
    return "ok"


def check_big_group(device: str) -> str:
    """A bf16 input of more than 2^31 elements in ONE group (G = 1), batch 1: int64 offsets and the
    group size past int32. The float64 reference is taken in chunks (the tensor is 4.3 GB), and y and dx
    are compared on three slices of 2^20 elements."""
    import gn_triton
    from gn_triton.reference import TOLERANCE

    C, L = 8, (1 << 28) + 3  # 2^31 + 24 elements
    x = torch.randn(1, C, L, device=device, dtype=torch.bfloat16).add_(3).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, device=device)).requires_grad_()
    b = torch.randn(C, device=device).requires_grad_()
    dy = torch.randn(1, C, L, device=device, dtype=torch.bfloat16)
    y = gn_triton.group_norm(x, 1, w, b)
    y.backward(dy)
    xd, wd = x.detach(), w.detach().double()
    chunks = [(c, s, min(s + (1 << 26), L)) for c in range(C) for s in range(0, L, 1 << 26)]
    count = C * L
    mean = sum(xd[0, c, s:e].double().sum() for c, s, e in chunks) / count
    rstd = 1 / torch.sqrt(sum(((xd[0, c, s:e].double() - mean) ** 2).sum() for c, s, e in chunks) / count + 1e-5)
    # dx = rstd*(gw - <gw> - x_hat*<gw*x_hat>), gw = dy*w[c]
    sum_gw = sum(dy[0, c, s:e].double().sum() * wd[c] for c, s, e in chunks)
    sum_gw_xhat = sum((dy[0, c, s:e].double() * (xd[0, c, s:e].double() - mean)).sum() * wd[c] * rstd
                      for c, s, e in chunks)  # fmt: skip
    worst = 0.0
    for c, s, e in [(0, 0, 1 << 20), (C - 1, L - (1 << 20), L), (C // 2, L // 2, L // 2 + (1 << 20))]:
        xhat = (xd[0, c, s:e].double() - mean) * rstd
        gw = dy[0, c, s:e].double() * wd[c]
        y_ref = xhat * wd[c] + b.detach().double()[c]
        dx_ref = rstd * (gw - sum_gw / count - xhat * sum_gw_xhat / count)
        for out, ref in ((y.detach()[0, c, s:e], y_ref), (x.grad[0, c, s:e], dx_ref)):
            err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            worst = max(worst, err if math.isfinite(err) else math.inf)
    tol = TOLERANCE[torch.bfloat16]  # bf16 outputs: their rounding dominates the sums' fp32 error
    return "ok" if worst <= tol else f"FAIL: y/dx error {worst:.3g} > tolerance {tol:.3g}"


def stage_correctness(job: Job, ctx: Context, clock: Clock) -> str:
    out = job.rows("correctness.csv", COLUMNS)
    checks = [(c.columns(), lambda c=c: check_case(c, ctx.device)) for c in correctness_cases(ctx.rehearse)]
    if ctx.device == "cuda":
        big = dict(case="big-group", plan="heuristic", layout="contiguous", dtype="bfloat16", epilogue="none",
                   affine="weight+bias", shape=f"1x8x{(1 << 28) + 3}", G=1)  # fmt: skip
        checks.append((big, lambda: check_big_group(ctx.device)))
    failed = done = 0
    for columns, check in checks:
        if clock.expired():
            break
        start = time.monotonic()
        try:
            status = check()
        except Exception as exc:  # a crash is a result to bring back, not the end of the run
            status = error_status(exc)
        out.write(dict(columns, status=status, seconds=round(time.monotonic() - start, 2)))
        failed += status != "ok"
        done += 1
        ctx.free()
    return f"{done} cases, {failed} with a failure"


def warm_correctness(ctx: Context) -> list[Callable]:
    return [lambda case=case: run_ours(case, ctx.device) for case in correctness_cases(False)]
