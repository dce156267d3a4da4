"""Batch-size sweep of GroupNorm throughput: gn_triton against torch eager, torch.compile and peers.

    python -m perf.sweep                       # default sweep (fits one 10-minute GPU call)
    python -m perf.sweep --full                # every suite, dtype, layout and batch size 1..64
    python -m perf.sweep --suite sd_vae --batch 1 2 --mode fwd --dtype bf16
    python -m perf.sweep --shape 128x20x256x256:32     # per-sample shape C x spatial : G

On a GPU each provider's output is checked against the float64 reference, then timed with
triton.testing.do_bench (median and 20th/80th percentiles, L2 flushed between runs; CUDA graphs for
tiny shapes where launch overhead dominates, inputs rotated). Throughput counts the floor bytes
(forward: read x + write y; backward: read x, dy + write dx; forward+backward: both) and is also
given as % of the device's copy bandwidth, measured in the same run.

Without a GPU it says so and runs a small functional sweep in Triton's interpreter (tiny shapes,
gn_triton vs torch on CPU): its SUMMARY.md is a correctness table against the float64 reference (the
interpreter's timings are no throughput and are not plotted), the GPU results committed under
perf/results/, and what gn_triton's cost model predicts for the default suites on an H100.

Output: <out>/sweep.csv (one row per measurement, written as it is measured: an interrupted sweep
keeps its rows), <out>/run.json (metadata), plots and SUMMARY.md (python -m perf.plot / perf.summary,
run at the end of the sweep). A whole GPU session's evidence is `python -m perf.gpu_evidence`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .rows import SWEEP_COLUMNS, RowFile
from .suites import BATCHES, DEFAULT_SUITES, FUNCTIONAL_SUITES, SUITES, Shape

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "bwd", "fwd+bwd")
LAYOUTS = ("contiguous", "channels_last")
# Loose sanity bounds for the pre-timing check (max error / max |reference|): a provider outside
# them computes something else and is reported as wrong, not timed.
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}
GRAPH_BELOW_BYTES = 8 << 20  # floor bytes under which CUDA graphs time the launch-bound calls
ROTATE_BELOW_BYTES = 64 << 20  # inputs smaller than this are rotated between several copies


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), help="shape suites (default: sd_unet sd_vae)")
    p.add_argument("--shape", nargs="+", default=[], help="custom per-sample shapes CxHxW[...]:G, e.g. 320x64x64:32")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1..32; --full: 1..64)")
    p.add_argument("--mode", nargs="+", choices=MODES, help="default: all three")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: bf16 (--full: all)")
    p.add_argument("--layout", nargs="+", choices=LAYOUTS, help="default: both")
    p.add_argument("--provider", nargs="+", help="default: all (absent peers are skipped with a reason)")
    p.add_argument(
        "--activation",
        choices=["silu", "gelu", "gelu_tanh"],
        help="time act(GroupNorm(x)): fused in gn_triton, GroupNorm then the activation for peers",
    )
    p.add_argument("--full", action="store_true", help="every suite, dtype, layout, batch 1..64")
    p.add_argument("--out", type=Path, help="output folder (default perf/out/<device>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--functional", action="store_true", help="force the CPU interpreter sweep")
    return p.parse_args(argv)


def custom_shape(text: str) -> Shape:
    """'CxHxW[...]:G' (per-sample shape and groups; G defaults to 32) as a Shape."""
    dims, _, groups = text.partition(":")
    C, *spatial = (int(d) for d in dims.lower().split("x"))
    return Shape("custom", C, tuple(spatial), int(groups or 32))


def plan_sweep(args, functional: bool) -> dict:
    """What to run: shapes, batches, modes, dtypes, layouts, providers."""
    from .providers import ALL

    if functional:  # tiny shapes; the other choices as asked
        shapes = [s for suite in FUNCTIONAL_SUITES.values() for s in suite]
        return dict(shapes=shapes, batches=args.batch or [1, 2, 4], modes=args.mode or list(MODES),
                    dtypes=args.dtype or ["fp32", "bf16"], layouts=args.layout or list(LAYOUTS),
                    providers=["gn_triton", "torch_eager"])  # fmt: skip
    suites = args.suite or (sorted(SUITES) if args.full else list(DEFAULT_SUITES))
    shapes = [custom_shape(t) for t in args.shape]
    if args.suite or not args.shape:
        shapes = [s for name in suites for s in SUITES[name]] + shapes
    return dict(
        shapes=shapes,
        batches=args.batch or (list(BATCHES) if args.full else [b for b in BATCHES if b <= 32]),
        modes=args.mode or list(MODES),
        dtypes=args.dtype or (sorted(DTYPES) if args.full else ["bf16"]),
        layouts=args.layout or list(LAYOUTS),
        providers=args.provider or ALL,
    )


def floor_bytes(mode: str, numel: int, elem: int) -> int:
    """Bytes that must cross memory: forward 2 (x, y), backward 3 (x, dy, dx), both 5 transfers."""
    return numel * elem * {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode]


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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

        if graph:
            ms = triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return (*ms, "cuda graph")
        ms = triton.testing.do_bench(fn, warmup=max(1, self.rep_ms // 4), rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return (*ms, "do_bench, L2 flushed")


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes / time)."""
    numel = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), graph=False)[0]
    return 2 * numel * 4 / ms / 1e6


def reference_check(provider, x, G, w, b, dy, mode, activation=None) -> float:
    """max error / max |ref| of y (and dx in backward modes) on the first two samples: GroupNorm is
    per sample, so this checks every code path of the call at a fraction of the cost."""
    from gn_triton.reference import group_norm_reference

    k = min(2, x.shape[0])
    xs = x[:k].detach().clone().requires_grad_()
    y = provider.fn(xs, G, w, b, 1e-5)
    xr = x[:k].detach().double().requires_grad_()
    yr = group_norm_reference(xr, G, w.detach().double(), b.detach().double(), 1e-5, activation)
    errors = [((y.double() - yr).abs().max() / yr.abs().max().clamp_min(1)).item()]
    if mode != "fwd":
        y.backward(dy[:k])
        yr.backward(dy[:k].double())
        errors.append(((xs.grad.double() - xr.grad).abs().max() / xr.grad.abs().max().clamp_min(1)).item())
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


def make_inputs(shape, N, dtype, layout, device, copies):
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


def memory_cap(shape: Shape, batches, dtype, device) -> tuple[list[int], str]:
    """Batch sizes whose tensors (x, y, dy, dx, grads: ~6 copies) fit in 60% of free GPU memory."""
    if device != "cuda":
        return list(batches), ""
    free = torch.cuda.mem_get_info()[0] * 0.6
    per_sample = math.prod((shape.C, *shape.spatial)) * dtype.itemsize * 6
    kept = [n for n in batches if n * per_sample <= free]
    dropped = [n for n in batches if n not in kept]
    return kept, (f"batches {dropped} skipped: over 60% of free GPU memory" if dropped else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    has_gpu = torch.cuda.is_available() and not args.functional
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before gn_triton is imported
        print("No GPU present: running a small FUNCTIONAL sweep in Triton's interpreter (tiny shapes,")
        print("gn_triton vs torch eager on CPU). Its timings are NOT a performance result.\n")
    import triton
    from tqdm import tqdm

    import gn_triton

    from . import plot, summary
    from .providers import providers

    device = "cuda" if has_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if has_gpu else f"cpu-{platform.machine()}-functional"
    out = args.out or Path(__file__).parent / "out" / device_name.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    sweep = plan_sweep(args, functional=not has_gpu)
    timer = Timer(device)
    copy_gbps = copy_bandwidth(device, timer)
    provs = providers(sweep["providers"], functional=not has_gpu, activation=args.activation)
    for p in provs:
        if p.fn is None:
            print(f"skipping {p.name}: {p.why_not}")
    meta = dict(
        run_kind="gpu-performance" if has_gpu else "cpu-functional",
        device=device_name,
        sm_count=torch.cuda.get_device_properties(0).multi_processor_count if has_gpu else 0,
        copy_gbps=round(copy_gbps, 1),
        torch=torch.__version__,
        triton=triton.__version__,
        gn_triton=gn_triton.__version__,
        commit=git_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=sys.version.split()[0],
        sweep={k: ([s.label for s in v] if k == "shapes" else v) for k, v in sweep.items()},
        activation=args.activation or "none",
        notes=[],
    )
    print(f"device: {device_name}; copy bandwidth {copy_gbps:.0f} GB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}, commit {meta['commit']}")  # fmt: skip

    (out / "run.json").write_text(json.dumps(meta, indent=1))
    (out / "sweep.csv").unlink(missing_ok=True)
    rows = RowFile(out / "sweep.csv", SWEEP_COLUMNS)
    jobs = list(itertools.product(sweep["shapes"], sweep["dtypes"], sweep["layouts"]))
    total = len(jobs) * len(sweep["batches"]) * len(sweep["modes"]) * len(provs)
    refresh = 0.5 if sys.stdout.isatty() else 15  # keep logs short when not on a terminal
    with tqdm(total=total, desc="sweep", unit="run", file=sys.stdout, mininterval=refresh) as bar:
        for shape, dtype_name, layout in jobs:
            dtype = DTYPES[dtype_name]
            batches, note = memory_cap(shape, sweep["batches"], dtype, device)
            if note:
                meta["notes"].append(f"{shape.label} {dtype_name}: {note}")
                bar.write(f"{shape.label} {dtype_name}: {note}")
                bar.update((len(sweep["batches"]) - len(batches)) * len(sweep["modes"]) * len(provs))
            for N in batches:
                numel = math.prod(shape.full(N))
                elem = dtype.itemsize
                copies = max(1, min(4, ROTATE_BELOW_BYTES // (numel * elem * 2))) if has_gpu else 1
                inputs = make_inputs(shape, N, dtype, layout, device, copies)
                for mode, prov in itertools.product(sweep["modes"], provs):
                    bar.update(1)
                    row = dict(meta_row(meta), stage="sweep", provider=prov.name, mode=mode, dtype=dtype_name,
                               layout=layout, suite=shape.suite, shape=shape.label, N=N, C=shape.C,
                               spatial="x".join(map(str, shape.spatial)), G=shape.G,
                               floor_bytes=floor_bytes(mode, numel, elem))  # fmt: skip
                    reason = "channels_last needs 4-D or 5-D input" if inputs is None else ""
                    reason = reason or prov.unsupported(inputs[0][0])
                    if reason:
                        rows.write(dict(row, status=f"skipped: {reason}"))
                        continue
                    rows.write(measure(row, prov, inputs, shape, mode, timer, has_gpu, copy_gbps, args.activation))
                del inputs
                if has_gpu:
                    torch.cuda.empty_cache()

    import pandas as pd

    rows.close()
    df = pd.read_csv(out / "sweep.csv")
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    print(f"\nwrote {out / 'sweep.csv'} ({len(df)} rows) and {out / 'run.json'}")
    if has_gpu:
        print(summary.console_table(df))
        summary.write_summary(df, meta, out / "SUMMARY.md")
    else:  # interpreter timings are no throughput: a correctness table, committed results, the model
        print(summary.write_functional_summary(df, meta, out / "SUMMARY.md"))
    if has_gpu and not args.no_plot:
        for path in plot.plot_all(df, meta, out):
            print(f"plot: {path}")
    wrong = df[df["status"].astype(str).str.startswith("wrong")]
    if len(wrong[wrong["provider"] == "gn_triton"]):
        print("gn_triton produced WRONG results in the rows above marked 'wrong'")
        return 1
    return 0


def meta_row(meta: dict) -> dict:
    keys = ("run_kind", "device", "sm_count", "copy_gbps", "torch", "triton", "gn_triton", "commit", "timestamp",
            "activation")  # fmt: skip
    return {k: meta[k] for k in keys}


def measure(row, prov, inputs, shape, mode, timer, has_gpu, copy_gbps, activation) -> dict:
    """Check one provider on one configuration, then time it; the CSV row."""
    x, w, b, dy = inputs[0]
    try:
        err = reference_check(prov, x, shape.G, w, b, dy, mode, activation)
        if not err <= CHECK_TOL[x.dtype]:
            return dict(row, status=f"wrong: error {err:.3g} vs float64 reference", check_error=err)
        # CUDA graphs for tiny forward calls only: autograd runs a backward on its forward's stream,
        # which a capture on another stream would not record.
        graph = has_gpu and row["floor_bytes"] < GRAPH_BELOW_BYTES and mode == "fwd"
        ms, p20, p80, how = timer(make_call(prov, inputs, shape.G, mode), graph)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(row, status="skipped: out of GPU memory")
    except Exception as exc:  # a provider that crashes on a shape is a result, not a stop
        return dict(row, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
    gbps = row["floor_bytes"] / ms / 1e6
    return dict(row, status="ok", check_error=err, ms=ms, ms_p20=p20, ms_p80=p80, timer=how, gbps=gbps,
                pct_copy_bw=100 * gbps / copy_gbps, samples_per_s=row["N"] / ms * 1e3)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
