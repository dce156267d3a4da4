"""Batch-size sweep of GroupNorm throughput: gn_triton against torch eager, torch.compile and peers.

    python -m perf.sweep                       # default sweep (fits one 10-minute GPU call)
    python -m perf.sweep --full                # every suite, dtype, layout and batch size 1..64
    python -m perf.sweep --suite sd_vae --batch 1 2 --mode fwd --dtype bf16
    python -m perf.sweep --shape 1x128x20x256x256:32   # x's shape N x C x spatial : G (as explain's)

On a GPU each provider's output is checked against the float64 reference, then timed (perf.measure
says how). Throughput counts the floor bytes (forward: read x + write y; backward: read x, dy +
write dx; forward+backward: both) and is also given as % of the device's copy bandwidth, measured in
the same run.

Without a GPU it says so and runs a small functional sweep with gn_triton's kernels in Triton's
interpreter (tiny shapes, gn_triton vs torch on the CPU; it checks that the interpreter really runs
them): its SUMMARY.md says per provider and dtype how many results were correct against the float64
reference and their largest error, and its plot (errors.png) shows those errors; the interpreter's
timings are no throughput and are not plotted. SUMMARY.md also lists the GPU results committed under
perf/results/ and what gn_triton's cost model predicts for the default suites on an H100.

Output: <out>/sweep.csv (one row per measurement, written as it is measured: an interrupted sweep
keeps its rows; a new run appends its rows under its own run_id), <out>/run.json (the latest run's
metadata), plots and SUMMARY.md of the latest run (python -m perf.plot / perf.summary). The
time-boxed benchmark job for a GPU host is `python -m perf.gpu_evidence` (perf/README.md).
"""

from __future__ import annotations

import itertools
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .measure import DTYPES, Point, Timer, copy_bandwidth, run_columns, run_points, use_interpreter
from .rows import RowFile, command_line, load_run
from .suites import BATCHES, DEFAULT_SUITES, FUNCTIONAL_SUITES, SUITES, Shape

MODES = ("fwd", "bwd", "fwd+bwd")
LAYOUTS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class Sweep:
    """A sweep as data: every combination of these, shapes outermost, providers innermost."""

    shapes: tuple[Shape, ...]
    batches: tuple[int, ...]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    providers: tuple[str, ...]
    activation: str | None = None

    def points(self) -> list[Point]:
        combos = itertools.product(self.shapes, self.dtypes, self.layouts, self.batches, self.modes)
        return [Point(shape, N, mode, dtype, layout, self.activation) for shape, dtype, layout, N, mode in combos]

    def describe(self) -> dict:
        return {k: ([s.label for s in v] if k == "shapes" else v) for k, v in self.__dict__.items()}


def parse_args(argv):
    p = command_line("python -m perf.sweep", __doc__)
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), help="shape suites (default: sd_unet sd_vae)")
    p.add_argument("--shape", nargs="+", default=[], help="shapes N x C x spatial : G as explain takes them, e.g. "
                   "2x320x64x64:32; their N are the batch sizes unless --batch is given")  # fmt: skip
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


def custom_shape(text: str) -> tuple[Shape, int]:
    """'NxCxHxW[...]:G', the grammar of `python -m gn_triton.explain`, as (Shape, N)."""
    from gn_triton.explain import parse_shape

    try:
        (N, C, *spatial), groups = parse_shape(text)
    except ValueError as exc:
        raise SystemExit(f"perf.sweep: --shape: {exc}") from None
    return Shape("custom", C, tuple(spatial), groups), N


def plan_sweep(args, functional: bool) -> Sweep:
    """What to run, from the command line (the functional run: tiny shapes, gn_triton and eager)."""
    from .providers import ALL

    if functional:
        shapes = [s for suite in FUNCTIONAL_SUITES.values() for s in suite]
        return Sweep(tuple(shapes), tuple(args.batch or (1, 2, 4)), tuple(args.mode or MODES),
                     tuple(args.dtype or ("fp32", "bf16")), tuple(args.layout or LAYOUTS),
                     ("gn_triton", "torch_eager"), args.activation)  # fmt: skip
    suites = args.suite or (sorted(SUITES) if args.full else list(DEFAULT_SUITES))
    custom = [custom_shape(t) for t in args.shape]
    shapes = [shape for shape, _ in custom]
    if args.suite or not args.shape:
        shapes = [s for name in suites for s in SUITES[name]] + shapes
    default_batches = sorted({N for _, N in custom}) if custom and not args.suite else None
    return Sweep(
        shapes=tuple(shapes),
        batches=tuple(args.batch or default_batches or (BATCHES if args.full else [b for b in BATCHES if b <= 32])),
        modes=tuple(args.mode or MODES),
        dtypes=tuple(args.dtype or (sorted(DTYPES) if args.full else ["bf16"])),
        layouts=tuple(args.layout or LAYOUTS),
        providers=tuple(args.provider or ALL),
        activation=args.activation,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    has_gpu = torch.cuda.is_available() and not args.functional
    if not has_gpu:
        use_interpreter()
        print("No GPU present: running a small FUNCTIONAL sweep of gn_triton's kernels in Triton's interpreter")
        print("(tiny shapes, gn_triton vs torch eager on the CPU). Its timings are NOT a performance result.\n")
    from tqdm import tqdm

    from . import plot, summary
    from .providers import providers

    device = "cuda" if has_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if has_gpu else f"cpu-{platform.machine()}-functional"
    out = args.out or Path(__file__).parent / "out" / device_name.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    sweep = plan_sweep(args, functional=not has_gpu)
    timer = Timer(device)
    copy_gbps = copy_bandwidth(device, timer)
    provs = providers(list(sweep.providers), functional=not has_gpu, activation=sweep.activation)
    for p in provs:
        if p.fn is None:
            print(f"skipping {p.name}: {p.why_not}")
    run = run_columns(device, device_name, copy_gbps, stage="sweep")
    meta = dict(run, activation=sweep.activation or "none", python=sys.version.split()[0], sweep=sweep.describe())
    print(f"device: {device_name}; copy bandwidth {copy_gbps:.0f} GB/s; torch {run['torch']}, "
          f"triton {run['triton']}, commit {run['commit']}")  # fmt: skip
    # `make bench` runs in an environment of its own: say which stack this is and how to bench another
    print(f"environment: {sys.prefix} (the stack of this Python; `python -m perf.sweep` in another environment "
          "benches that one's torch and triton)")  # fmt: skip
    (out / "run.json").write_text(json.dumps(meta, indent=1))

    points = sweep.points()
    rows = RowFile(out / "sweep.csv")
    refresh = 0.5 if sys.stdout.isatty() else 15  # keep logs short when not on a terminal
    with tqdm(total=len(points) * len(provs), desc="sweep", unit="run", file=sys.stdout, mininterval=refresh) as bar:
        run_points(points, lambda activation: provs, rows, run, timer, copy_gbps, progress=bar.update)
    rows.close()

    df = load_run(out)[1]["sweep"]
    print(f"\nwrote {out / 'sweep.csv'} ({len(df)} rows of run {run['run_id']}) and {out / 'run.json'}")
    if has_gpu:
        print(summary.console_table(df))
        summary.write_summary(df, meta, out / "SUMMARY.md")
    else:  # interpreter timings are no throughput: correctness counts, committed results, the model
        print(summary.write_functional_summary(df, meta, out / "SUMMARY.md"))
        print(f"wrote {out / 'SUMMARY.md'}")
    if not args.no_plot:
        for path in plot.plot_all(df, meta, out) if has_gpu else [plot.error_figure(df, meta, out / "errors.png")]:
            print(f"plot: {path}")
    wrong = df[df["status"].astype(str).str.startswith("wrong")]
    if len(wrong[wrong["provider"] == "gn_triton"]):
        print("gn_triton produced WRONG results in the rows above marked 'wrong'")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
