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
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


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


def references(calls: int, repeats: int) -> dict[str, float]:
    x = torch.empty(64)
    _empty_kernel[(1,)](x, 64, BLOCK=16)
    compiled = _empty_kernel[(1,)](x, 64, BLOCK=16)
    run, fn, meta = compiled.run, compiled.function, compiled.packed_metadata
    small = torch.randn(1, 4, 16)
    step_x = torch.randn(1, 16, 16, requires_grad=True)
    step_w, step_b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)

    def torch_step():
        y = F.silu(F.group_norm(step_x, 4, step_w, step_b))
        torch.autograd.grad(y, (step_x, step_w, step_b), y)

    return {
        "L": cpu_us(lambda: _empty_kernel[(1,)](x, 64, BLOCK=16), calls, repeats),
        "compiled entry": cpu_us(lambda: run(1, 1, 1, 0, fn, meta, None, None, None, x, 64, 16), calls, repeats),
        "torch group_norm, 64 elements": cpu_us(lambda: F.group_norm(small, 2), calls, repeats),
        "T": cpu_us(torch_step, calls, repeats),
    }


# (label, N, C, spatial, G): the suites' shapes (perf/suites.py) a user's eager loop calls most.
SHAPES = [
    ("SD U-Net 1x1280x8x8", 1, 1280, (8, 8), 32),
    ("SD U-Net 2x320x64x64", 2, 320, (64, 64), 32),
    ("SD VAE 32x512x128x128", 32, 512, (128, 128), 32),
    ("video VAE 32x256x10x128x128", 32, 256, (10, 128, 128), 32),
]


def gn_rows(calls: int, repeats: int, ref: dict) -> list[dict]:
    import gn_triton
    from gn_triton import _launch, stats
    from gn_triton._plan import Affine

    rows = []

    def row(route, shape, call, budget_l=None, budget_t=None, calls=calls):
        launches = launches_of(call)
        us = cpu_us(call, calls, repeats)
        budget = budget_l * ref["L"] if budget_l is not None else budget_t * ref["T"] if budget_t else None
        rows.append(dict(route=route, shape=shape, dtype="bf16", launches=launches, host_us=round(us, 2),
                         in_L=round(us / ref["L"], 2), in_T=round(us / ref["T"], 3),
                         budget_us=None if budget is None else round(budget, 2),
                         within=None if budget is None else us <= budget))  # fmt: skip
        print(f"{route:<34} {shape:<28} {launches:>3} launches {us:9.1f} us {us / ref['L']:7.2f} L"
              + ("" if budget is None else f"  budget {budget:8.1f} us {'ok' if us <= budget else 'OVER'}"))
        return us

    for label, n, c, spatial, g in SHAPES:
        big = n * c > 4096
        x = torch.empty((n, c, *spatial), dtype=BF16)  # never read: the launcher does nothing
        w, b = torch.randn(c), torch.randn(c)
        few = max(3, calls // (20 if big else 1))
        with torch.no_grad():
            fn = lambda: gn_triton.group_norm(x, g, w, b, activation="silu")  # noqa: E731
            launches = launches_of(fn)
            fn_us = row("group_norm, no grad", label, fn, 3 + (launches - 1), calls=few)
            if big:
                continue
            module = gn_triton.GroupNorm(g, c, activation="silu")
            module_us = row("GroupNorm module, no grad", label, lambda: module(x))
            rows[-1]["budget_us"] = round(fn_us + ref["L"], 2)
            rows[-1]["within"] = module_us <= fn_us + ref["L"]
            with gn_triton.enable_eager_override():
                override_us = row("F.group_norm, eager override", label, lambda: F.group_norm(x, g, w, b))
            rows[-1]["budget_us"] = round(fn_us + 3 * ref["L"], 2)
            rows[-1]["within"] = override_us <= fn_us + 3 * ref["L"]
            op = torch.ops.gn_triton.group_norm_fwd.default
            row("custom op (a compiled graph's call)", label, lambda: op(x, w, b, g, 1e-5, "silu"))
            row("stats.group_stats", label, lambda: stats.group_stats(x, g))
            affine = Affine(w, b, None, None, "silu")
            row("_launch.gn_fwd", label, lambda: _launch.gn_fwd(x, g, 1e-5, affine))
        if big:
            continue
        xg = x.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        dy = torch.empty_like(x)

        def step():
            y = gn_triton.group_norm(xg, g, wg, bg, activation="silu")
            torch.autograd.grad(y, (xg, wg, bg), dy)

        row("training step (fwd + autograd.grad)", label, step, budget_t=1.0)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per repeat (fewer for the batch-32 shapes)")
    parser.add_argument("--out", type=Path, default=Path("perf/results/host"))
    args = parser.parse_args(argv)
    stand_in_driver.use(stand_in_driver.StandInDriver(check=False))
    route_cpu_tensors_to_the_kernels()
    torch.set_num_threads(1)
    ref = references(args.calls, args.repeats)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    for name, us in ref.items():
        print(f"reference {name:<34} {us:8.2f} us {us / ref['L']:6.2f} L")
    rows = gn_rows(args.calls, args.repeats, ref)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_triton{triton.__version__}.json"
    meta = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), repeats=args.repeats, calls=args.calls,
                measured="process CPU time per call, best of repeats; stand-in driver, launcher doing nothing")  # fmt: skip
    path.write_text(json.dumps(dict(meta=meta, references_us=ref, rows=rows), indent=1) + "\n")
    over = [r for r in rows if r["within"] is False]
    print(f"{len(rows)} rows, {len(over)} over budget; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
