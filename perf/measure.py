"""Measuring GroupNorm providers: a point's inputs, the check against the float64 reference, the timed
call and the Row it yields. `run_points` is the one runner: the sweep (perf.sweep) and the GPU
evidence run (perf.gpu_evidence) both hand it a list of points.

On a GPU a provider is timed with triton.testing.do_bench (median and 20th/80th percentiles, L2
flushed between runs), or by CUDA-graph replay for tiny forward calls where launches dominate; inputs
smaller than 64 MB are rotated between copies. Throughput counts the floor bytes (gn_triton._cost) and
is also given as % of the copy bandwidth measured in the same run. On the CPU (the interpreter) the
timing is three perf_counter samples: a functional check, not a performance figure.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .rows import Row, RowFile
from .suites import Shape

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Loose sanity bounds for the pre-timing check (max error / max |reference|): a provider outside
# them computes something else and is reported as wrong, not timed.
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}
GRAPH_BELOW_BYTES = 8 << 20  # floor bytes under which CUDA graphs time the launch-bound calls
ROTATE_BELOW_BYTES = 64 << 20  # inputs smaller than this are rotated between several copies


@dataclass(frozen=True)
class Point:
    """What one measurement is of: a per-sample shape at batch N, a mode, dtype, layout, activation."""

    shape: Shape
    N: int
    mode: str  # fwd, bwd, fwd+bwd
    dtype: str = "bf16"
    layout: str = "contiguous"
    activation: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape.full(self.N))

    def row(self, run: dict, provider: str) -> Row:
        """The row of this point for a provider, with the run-level columns in `run`."""
        from gn_triton._cost import floor_bytes

        return Row(**run, activation=self.activation or "none", provider=provider, mode=self.mode, dtype=self.dtype,
                   layout=self.layout, suite=self.shape.suite, shape=self.shape.label, N=self.N, C=self.shape.C,
                   spatial="x".join(map(str, self.shape.spatial)), G=self.shape.G,
                   floor_bytes=floor_bytes(self.mode, self.numel, DTYPES[self.dtype].itemsize))  # fmt: skip


def use_interpreter() -> None:
    """Run gn_triton's kernels in Triton's interpreter. Triton decides at decoration time, so this
    must come before gn_triton is imported; it checks that the kernels really are interpreted (a
    CPU tensor would otherwise run torch's fallback and the run would check torch against itself)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from gn_triton import _checks

    if not _checks.INTERPRET:
        raise RuntimeError("gn_triton was imported before TRITON_INTERPRET=1 was set: its kernels would not run")


class Timer:
    """Median/p20/p80 milliseconds of a callable, on the GPU or (functional run) the CPU; rep_ms is
    the GPU timing window per measurement (the evidence run shortens it to fit its budget)."""

    def __init__(self, device: str, rep_ms: int = 100):
        self.device = device
        self.rep_ms = rep_ms

    def __call__(self, fn, graph: bool) -> tuple[float, float, float, str]:
        if self.device == "cpu":
            fn()
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            samples.sort()
            return statistics.median(samples), samples[0], samples[-1], "cpu perf_counter x3"
        import triton.testing

        quantiles = [0.5, 0.2, 0.8]
        if graph:
            return (*triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, quantiles=quantiles), "cuda graph")
        ms = triton.testing.do_bench(fn, warmup=max(1, self.rep_ms // 4), rep=self.rep_ms, quantiles=quantiles)
        return (*ms, "do_bench, L2 flushed")


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes / time)."""
    numel = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), graph=False)[0]
    return 2 * numel * 4 / ms / 1e6


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_columns(device: str, device_name: str, copy_gbps: float, stage: str) -> dict:
    """The run-level columns of every row of a run (its run_id is its start time)."""
    import triton

    import gn_triton

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0
    return dict(run_id=now, stage=stage, run_kind="gpu-performance" if device == "cuda" else "cpu-functional",
                device=device_name, sm_count=sms, copy_gbps=round(copy_gbps, 1), torch=torch.__version__,
                triton=triton.__version__, gn_triton=gn_triton.__version__, commit=git_commit(),
                kernel_version=gn_triton.kernels.KERNEL_VERSION, timestamp=now)  # fmt: skip


def reference_check(provider, x, G, w, b, dy, mode, activation=None) -> float:
    """max error / max |ref| of y (and dx in backward modes) on the first two samples: GroupNorm is
    per sample, so this checks every code path of the call at a fraction of the cost."""
    from gn_triton.reference import group_norm_reference, relative_error

    k = min(2, x.shape[0])
    xs = x[:k].detach().clone().requires_grad_()
    y = provider.fn(xs, G, w, b, 1e-5)
    xr = x[:k].detach().double().requires_grad_()
    yr = group_norm_reference(xr, G, w.detach().double(), b.detach().double(), 1e-5, activation)
    errors = [relative_error(y, yr)]
    if mode != "fwd":
        y.backward(dy[:k])
        yr.backward(dy[:k].double())
        errors.append(relative_error(xs.grad, xr.grad))
    return max(errors)


def make_call(provider, inputs, G, mode):
    """The timed callable for a mode, cycling through `inputs` (rotation for L2-sized tensors)."""
    cycle = itertools.cycle(inputs)
    if mode == "fwd":

        def call():
            x, w, b, _ = next(cycle)
            with torch.no_grad():
                provider.fn(x, G, w, b, 1e-5)

        return call
    if mode == "fwd+bwd":

        def call():
            x, w, b, dy = next(cycle)
            x.grad = w.grad = b.grad = None
            provider.fn(x, G, w, b, 1e-5).backward(dy)

        return call
    outputs = [(provider.fn(x, G, w, b, 1e-5), x, w, b, dy) for x, w, b, dy in inputs]
    cycle_out = itertools.cycle(outputs)

    def call():
        y, x, w, b, dy = next(cycle_out)
        x.grad = w.grad = b.grad = None
        y.backward(dy, retain_graph=True)

    return call


def make_inputs(shape: Shape, N: int, dtype: torch.dtype, layout: str, device: str, copies: int):
    """`copies` sets of fresh random (x, weight, bias, dy); None when the layout does not apply."""
    out = []
    for _ in range(copies):
        x = torch.randn(shape.full(N), device=device, dtype=dtype)
        if layout == "channels_last":
            if x.dim() not in (4, 5):
                return None
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x.requires_grad_()
        w = (1 + 0.1 * torch.randn(shape.C, device=device)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(shape.C, device=device)).to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        out.append((x, w, b, dy))
    return out


def _too_big(point: Point, device: str) -> str:
    """Why a point's tensors (x, y, dy, dx, grads: ~6 copies) do not fit 60% of free GPU memory, or ''."""
    if device != "cuda":
        return ""
    needed = point.numel * DTYPES[point.dtype].itemsize * 6
    return "over 60% of free GPU memory" if needed > 0.6 * torch.cuda.mem_get_info()[0] else ""


def measure(row: Row, provider, inputs, point: Point, timer: Timer, copy_gbps: float) -> Row:
    """Check one provider at one point, then time it."""
    x, w, b, dy = inputs[0]
    try:
        err = reference_check(provider, x, point.shape.G, w, b, dy, point.mode, point.activation)
        if not err <= CHECK_TOL[x.dtype]:
            return dataclasses.replace(row, status=f"wrong: error {err:.3g} vs float64 reference", check_error=err)
        # CUDA graphs for tiny forward calls only: autograd runs a backward on its forward's stream,
        # which a capture on another stream would not record.
        graph = timer.device == "cuda" and row.floor_bytes < GRAPH_BELOW_BYTES and point.mode == "fwd"
        ms, p20, p80, how = timer(make_call(provider, inputs, point.shape.G, point.mode), graph)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dataclasses.replace(row, status="skipped: out of GPU memory")
    except Exception as exc:  # a provider that crashes on a shape is a result, not a stop
        return dataclasses.replace(row, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
    gbps = row.floor_bytes / ms / 1e6
    return dataclasses.replace(row, status="ok", check_error=err, ms=ms, ms_p20=p20, ms_p80=p80, timer=how,
                               gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps,
                               samples_per_s=row.N / ms * 1e3)  # fmt: skip


def run_points(
    points: Sequence[Point],
    providers: Callable[[str | None], list],
    out: RowFile,
    run: dict,
    timer: Timer,
    copy_gbps: float,
    expired: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] = lambda n: None,
) -> int:
    """Check then time each provider (providers(activation) -> list) at each point, one Row each,
    written as measured; the first call of each (compilation included) is timed apart. Stops between
    measurements once expired(). Returns the number of measurements."""
    timed = 0
    for point in points:
        provs = providers(point.activation)
        if expired():
            break
        dtype = DTYPES[point.dtype]
        copies = max(1, min(4, ROTATE_BELOW_BYTES // (point.numel * dtype.itemsize * 2)))
        reason = _too_big(point, timer.device)
        inputs = None
        if not reason:
            try:
                inputs = make_inputs(point.shape, point.N, dtype, point.layout, timer.device,
                                     copies if timer.device == "cuda" else 1)  # fmt: skip
                reason = "channels_last needs 4-D or 5-D input" if inputs is None else ""
            except torch.cuda.OutOfMemoryError:
                reason = "out of GPU memory"
        for prov in provs:
            progress(1)
            row = point.row(run, prov.name)
            why = reason or prov.unsupported(inputs[0][0])
            if why:
                out.write(dataclasses.replace(row, status=f"skipped: {why}"))
                continue
            if expired():
                break
            try:
                first = _first_call(make_call(prov, inputs[:1], point.shape.G, point.mode), timer.device)
            except Exception as exc:  # measure() reports the failure with the row
                first = f"error: {type(exc).__name__}"[:60]
            out.write(dataclasses.replace(measure(row, prov, inputs, point, timer, copy_gbps), first_call_s=first))
            timed += 1
        del inputs
        if timer.device == "cuda":
            torch.cuda.empty_cache()
    return timed


def _first_call(call: Callable[[], None], device: str) -> float:
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
