"""The host path's cost: CPU time per gn_triton call for every route a user takes, without a GPU.

    python -m perf.host_report [--repeats 7] [--out perf/results/host]   # TRITON_INTERPRET unset

Triton's real launch machinery runs with the stand-in driver of perf/stand_in_driver.py, whose launcher
does nothing: what is left of a call is its host path (Python, torch's dispatcher and allocator, Triton's
launch code), measured as the process's CPU time (`time.process_time`), the best of `--repeats` repeats
of a loop of calls. CPU tensors are routed to the kernel path and planned as on an H100 (132 SMs, 50 MB
L2), so each call runs exactly the launches it would on that GPU; their data is never read.

Every figure is also given as a ratio to references measured in the same run, so that runs on other
machines compare: L, one empty Triton kernel launched through `JITFunction.run`; T, torch's own CPU
group_norm + SiLU forward and `autograd.grad` on 256 elements (a training step's dispatcher work);
also the compiled kernel's own entry and torch's CPU group_norm of 64 elements. Each gn_triton row has
its budget (docs/host-path.md says why): no-grad calls 3 L plus 1 L per launch beyond the first, a
training step 1.0 T, the module within 1 L of the function, the eager override within 3 L of it.
Writes host_triton<version>.json (one row per measurement) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("perf.host_report drives compiled kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import stand_in_driver  # noqa: E402

BF16 = torch.bfloat16


@triton.jit
def _empty_kernel(X, n, BLOCK: tl.constexpr):
    pass


def cpu_us(call, calls: int, repeats: int) -> float:
    """Best of `repeats` of the CPU time per call of `calls` calls (after one warm-up call)."""
    return best_of({"call": (call, calls)}, repeats)["call"]


def best_of(calls: dict, repeats: int) -> dict[str, float]:
    """{name: (call, n)} -> {name: best CPU us per call}: each repeat runs every name's n calls in turn,
    so that a row and the references it is compared with see the same moments of a noisy machine."""
    for call, _ in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, (call, n) in calls.items():
            start = time.process_time()
            for _ in range(n):
                call()
            best[name] = min(best[name], (time.process_time() - start) / n)
    return {name: us * 1e6 for name, us in best.items()}


def route_cpu_tensors_to_the_kernels() -> None:
    """CPU tensors take the kernel path, planned for an H100 (the stand-in driver's device)."""
    from gn_triton import _checks, _cost, _tuning

    _checks.INTERPRET = True  # backend_for: CPU tensors "run on kernels" (here: the stand-in driver)
    plan_for = _tuning.heuristic_plan
    _tuning.heuristic_plan = lambda direction, p, device: plan_for(direction, p, _cost.DEVICES["h100"])


def launches_of(call) -> int:
    before = stand_in_driver.StandInDriver.launch_count
    call()
    return stand_in_driver.StandInDriver.launch_count - before


class _FloorFunction(torch.autograd.Function):
    """An autograd.Function with the eager route's arguments and saved tensors that only allocates its
    outputs: what torch's autograd machinery alone costs a training step of gn_triton's eager route."""

    @staticmethod
    def forward(ctx, input, program, eps, weight, bias):
        ctx.save_for_backward(input, torch.empty(64), weight, bias)
        return torch.empty_like(input)

    @staticmethod
    def backward(ctx, grad):
        input, _work, weight, bias = ctx.saved_tensors
        return torch.empty_like(input), None, None, torch.empty_like(weight), torch.empty_like(bias)


def reference_calls() -> dict:
    """The references' calls by name: L, the compiled entry, torch's own group_norm, T, and the
    autograd.Function floor of a training step."""
    x = torch.empty(64)
    compiled = _empty_kernel[(1,)](x, 64, BLOCK=16)
    run, fn, meta = compiled.run, compiled.function, compiled.packed_metadata
    small = torch.randn(1, 4, 16)
    step_x = torch.randn(1, 16, 16, requires_grad=True)
    step_w, step_b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    floor_x = torch.empty(1, 1280, 8, 8, dtype=BF16, requires_grad=True)
    floor_w, floor_b = torch.randn(1280, requires_grad=True), torch.randn(1280, requires_grad=True)

    @torch.enable_grad()  # also when measured beside a no-grad row
    def torch_step():
        y = F.silu(F.group_norm(step_x, 4, step_w, step_b))
        torch.autograd.grad(y, (step_x, step_w, step_b), y)

    @torch.enable_grad()
    def floor_step():
        y = _FloorFunction.apply(floor_x, None, 1e-5, floor_w, floor_b)
        torch.autograd.grad(y, (floor_x, floor_w, floor_b), y)

    return {
        "L": lambda: _empty_kernel[(1,)](x, 64, BLOCK=16),
        "compiled entry": lambda: run(1, 1, 1, 0, fn, meta, None, None, None, x, 64, 16),
        "torch group_norm, 64 elements": lambda: F.group_norm(small, 2),
        "T": torch_step,
        "autograd.Function floor of a step": floor_step,
    }


# (label, N, C, spatial, G): the suites' shapes (perf/suites.py) a user's eager loop calls most.
SHAPES = [
    ("SD U-Net 1x1280x8x8", 1, 1280, (8, 8), 32),
    ("SD U-Net 2x320x64x64", 2, 320, (64, 64), 32),
    ("SD VAE 32x512x128x128", 32, 512, (128, 128), 32),
    ("video VAE 32x256x10x128x128", 32, 256, (10, 128, 128), 32),
]


class Rows:
    """The report's rows. Each is measured interleaved with L and T (best_of), and its budget is
    reckoned from those: a ratio holds on a machine whose speed drifts."""

    def __init__(self, refs: dict, t_us: float, calls: int, repeats: int) -> None:
        self.refs, self.t_us, self.calls, self.repeats, self.rows = refs, t_us, calls, repeats, []

    def add(self, route: str, shape: str, call, budget=None, calls: int | None = None, beside: dict | None = None,
            with_t: bool = True):  # fmt: skip
        """Measure `call` (calls per repeat: `calls`, default the report's); `budget(measured)` gives its
        budget from the measured L, T and any `beside` calls (name: call), or None for no budget. T is left
        out where the row's context would change it (the eager override reroutes torch's own group_norm):
        the run's own T stands in."""
        launches = launches_of(call)
        beside = dict(beside or {}, L=self.refs["L"], **({"T": self.refs["T"]} if with_t else {}))
        measured = best_of({"row": (call, calls or self.calls)}
                           | {name: (c, self.calls) for name, c in beside.items()}, self.repeats)  # fmt: skip
        measured.setdefault("T", self.t_us)
        us, L, T = measured["row"], measured["L"], measured["T"]  # noqa: N806 - the report's names
        budget_us = None if budget is None else budget(measured)
        self.rows.append(dict(route=route, shape=shape, dtype="bf16", launches=launches, host_us=round(us, 2),
                              L_us=round(L, 2), T_us=round(T, 2), in_L=round(us / L, 2), in_T=round(us / T, 3),
                              budget_us=None if budget_us is None else round(budget_us, 2),
                              within=None if budget_us is None else us <= budget_us,
                              **{f"{k} us": round(measured[k], 2) for k in beside if k not in "LT"}))  # fmt: skip
        verdict = "" if budget_us is None else f"  budget {budget_us:8.1f} us {'ok' if us <= budget_us else 'OVER'}"
        print(f"{route:<38} {shape:<28} {launches:>3} launches {us:9.1f} us {us / L:6.2f} L {us / T:5.2f} T{verdict}")
        return us


def shape_rows(rows: Rows, label: str, n: int, c: int, spatial: tuple, g: int) -> None:
    """Every route a user takes for one shape (bf16, weight and bias, fused SiLU)."""
    import gn_triton
    from gn_triton import _launch, stats
    from gn_triton._plan import Affine

    x = torch.empty((n, c, *spatial), dtype=BF16)  # never read: the launcher does nothing
    w, b = torch.randn(c), torch.randn(c)
    big = n * c > 4096
    with torch.no_grad():
        call = lambda: gn_triton.group_norm(x, g, w, b, activation="silu")  # noqa: E731
        extra = launches_of(call) - 1
        rows.add("group_norm, no grad", label, call, lambda m: (3 + extra) * m["L"], calls=3 if big else None)
        if big:
            return
        module = gn_triton.GroupNorm(g, c, activation="silu")
        rows.add("GroupNorm module, no grad", label, lambda: module(x), lambda m: m["function"] + m["L"],
                 beside={"function": call})  # fmt: skip
        with gn_triton.enable_eager_override():
            plain = lambda: gn_triton.group_norm(x, g, w, b)  # noqa: E731  (what the override's call computes)
            rows.add("F.group_norm, eager override", label, lambda: F.group_norm(x, g, w, b),
                     lambda m: m["function"] + 3 * m["L"], beside={"function": plain}, with_t=False)  # fmt: skip
        op = torch.ops.gn_triton.group_norm_fwd.default
        rows.add("custom op (a compiled graph's call)", label, lambda: op(x, w, b, g, 1e-5, "silu"))
        affine = Affine(w, b, None, None, "silu")
        rows.add("_launch.gn_fwd (the op's body)", label, lambda: _launch.gn_fwd(x, g, 1e-5, affine))
        rows.add("stats.group_stats", label, lambda: stats.group_stats(x, g))
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.empty_like(x)

    def step():
        y = gn_triton.group_norm(xg, g, wg, bg, activation="silu")
        torch.autograd.grad(y, (xg, wg, bg), dy)

    floor = rows.refs["autograd.Function floor of a step"]
    rows.add("training step (fwd + autograd.grad)", label, step, lambda m: m["T"], beside={"autograd floor": floor})


def markdown(reports: list[dict], before: list[dict]) -> list[str]:
    """The docs' table (docs/host-path.md) of committed reports, one column per triton; `before`: the
    same benchmark at the commit before launch programs, shown beside its triton's column."""

    def cell(row):
        verdict = "" if row.get("within") is None else (" ✓" if row["within"] else " ✗")
        return f"{row['host_us']:.1f} µs = {row['in_L']:.1f} L / {row['in_T']:.2f} T{verdict}"

    old = {(r["triton"], row["route"], row["shape"]): row for r in before for row in r["rows"]}
    heads = []
    for r in reports:
        version = r["meta"]["triton"]
        heads += ([f"before, triton {version}"] if any(k[0] == version for k in old) else []) + [f"triton {version}"]
    lines = ["| route | shape | launches | " + " | ".join(heads) + " |", "|---" * (3 + len(heads)) + "|"]
    for i, row in enumerate(reports[0]["rows"]):
        cells = []
        for r in reports:
            version = r["meta"]["triton"]
            if any(k[0] == version for k in old):
                prev = old.get((version, row["route"], row["shape"]))
                cells.append(f"{prev['host_us']:.1f} µs = {prev['in_L']:.1f} L / {prev['in_T']:.2f} T" if prev else "-")
            cells.append(cell(r["rows"][i]))
        lines.append(f"| {row['route']} | {row['shape']} | {row['launches']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="repeats of a loop of calls; the best counts")
    parser.add_argument("--calls", type=int, default=40, help="calls per repeat (3 for the batch-32 shapes)")
    parser.add_argument("--out", type=Path, default=Path("perf/results/host"))
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON", help="print the docs' table of these reports")
    parser.add_argument("--before", type=Path, nargs="*", default=[], metavar="JSON", help="with --table: before")
    args = parser.parse_args(argv)
    if args.table:
        load = lambda path: json.loads(path.read_text())  # noqa: E731
        before = [dict(load(p), triton=load(p)["meta"]["triton"]) for p in args.before]
        print("\n".join(markdown([load(p) for p in args.table], before)))
        return 0
    stand_in_driver.use(stand_in_driver.StandInDriver(check=False))
    route_cpu_tensors_to_the_kernels()
    torch.set_num_threads(1)
    refs = reference_calls()
    ref = best_of({name: (call, args.calls) for name, call in refs.items()}, args.repeats)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    for name, us in ref.items():
        print(f"reference {name:<34} {us:8.2f} us {us / ref['L']:6.2f} L {us / ref['T']:5.2f} T")
    rows = Rows(refs, ref["T"], args.calls, args.repeats)
    for shape in SHAPES:
        shape_rows(rows, *shape)
    rows = rows.rows
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_triton{triton.__version__}.json"
    meta = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), repeats=args.repeats, calls=args.calls,
                measured="process CPU time per call, best of repeats; stand-in driver, its launcher doing nothing",
                shapes="bf16, weight and bias, fused SiLU, planned for an H100")  # fmt: skip
    path.write_text(json.dumps(dict(meta=meta, references_us=ref, rows=rows), indent=1) + "\n")
    over = [r for r in rows if r["within"] is False]
    print(f"{len(rows)} rows, {len(over)} over budget; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
