"""Triton's real launch path without a GPU: `python tests/launch_path.py` (TRITON_INTERPRET unset).

What only a GPU run exercised before: triton's binder (argument binding and specialisation: integer
values of 1 and multiples of 16, pointer alignment), the kernel cache key (with the Epilogue/Layout
NamedTuple constexprs), compilation to a cubin by the wheel's ptxas, and the hand-off to the launcher.
The stand-in driver of perf/stand_in_driver.py replaces the real one: it reports an sm_90 target,
accepts the cubin (an ELF file) where the real driver would load it, and its launcher checks each
argument against the compiled kernel's signature as the C launcher reads them and records the launch
instead of running it.

1. Every kernel of a fused and a split plan runs through it (forward, and backward with every
   gradient, with a fused activation and per-sample scale/shift), and the parts gn_triton.stats and
   gn_triton.distributed run.
2. The cached launch programs (gn_triton._launch): over a set of random calls (shapes, strides,
   offsets into storage, dtypes, layouts, epilogues, plans, gradients asked for), a call launched
   through the compiled kernels' own entries launches the same binaries, on the same grids, with the
   same argument values (pointers as addresses: the call's allocations are replayed) as the same call
   through triton's JITFunction.run; and a call whose specialisation differs (an unaligned view after
   an aligned one, S = 1, an integer argument of 1) never reuses another's binary; with a launch hook
   set (a profiler's), programs launch through JITFunction.run.

It prints one line per check and exits non-zero on any failure; tests/test_launch_path.py runs it under
whatever triton is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("launch_path.py drives compiled kernels: run it without TRITON_INTERPRET=1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/, when run as a script

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from perf.stand_in_driver import StandInDriver, check_argument, use  # noqa: E402


@triton.jit
def _copy_kernel(X, Y, n, FLAGS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    scale = 2.0 if FLAGS[0] else 1.0
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * scale, mask=offs < n)


def check_harness_refuses() -> None:
    """The harness must fail where a real launch would: a constexpr the runtime cannot bind, an
    argument the launcher cannot read."""
    x, y = torch.randn(64), torch.empty(64)
    _copy_kernel[(1,)](x, y, 64, (True,), BLOCK=64)  # a tuple constexpr binds
    refused = {
        "unbindable constexpr (an object)": lambda: _copy_kernel[(1,)](x, y, 64, object(), BLOCK=64),
        "constexpr not a power of two for arange": lambda: _copy_kernel[(1,)](x, y, 64, (True,), BLOCK=48),
        "an i32 argument past 2^31": lambda: check_argument("n", "i32", 2**31),
        "a float where a pointer is compiled": lambda: check_argument("X", "*fp32", 1.5),
    }
    for what, launch in refused.items():
        try:
            launch()
        except Exception as e:  # noqa: BLE001  (any failure is the expected outcome)
            print(f"refused as expected: {what}: {type(e).__name__}")
        else:
            raise SystemExit(f"the harness accepted a launch it must refuse: {what}")


# bf16 in both layouts, and fp32: the dtype and layout constexprs of every kernel change between them.
LAYOUTS = [
    (torch.bfloat16, torch.contiguous_format),
    (torch.bfloat16, torch.channels_last),
    (torch.float32, torch.contiguous_format),
]


def run_gn_triton() -> Counter:
    """Every kernel of a fused and a split plan (forward; backward with all five gradients), and the
    parts gn_triton.stats and gn_triton.distributed run (statistics, normalise, gradient sums, dx)."""
    from gn_triton import _launch, _parts, _tuning
    from gn_triton._plan import Affine

    torch.manual_seed(0)
    n, c, g = 2, 8, 4
    plans = {
        "fused": dict(split=1, groups_per_program=2, block_c=4, block_s=64),
        "split": dict(split=3, groups_per_program=2, block_c=4, block_s=16, wave_blocks=0),
        "split in waves": dict(split=2, groups_per_program=1, block_c=2, block_s=32, wave_blocks=3),
        "split in channel chunks": dict(split=2, groups_per_program=1, block_c=1, block_s=32, wave_blocks=0, chunks=2),
    }
    for dtype, memory_format in LAYOUTS:
        x = torch.randn(n, c, 12, 10, dtype=dtype).contiguous(memory_format=memory_format)
        w, b = torch.randn(c), torch.randn(c)
        scale, shift = torch.randn(n, c, dtype=dtype), torch.randn(n, c, dtype=dtype)
        affine = Affine(w, b, scale, shift, "silu")
        for plan, fields in plans.items():
            with _tuning.override_plan(**fields):
                _y, mean, mean_lo, rstd = _launch.gn_fwd(x, g, 1e-5, affine)
                _launch.gn_bwd(torch.randn_like(x), x, g, affine, mean, mean_lo, rstd, [True] * 5)
                count = _parts.group_stats(x, g)[0]  # launched, not run: the values are not looked at
                _parts.normalize(x, g, affine, mean, mean_lo, rstd, x.dtype)
                sums = _parts.grad_sums(torch.randn_like(x), x, g, affine, mean, mean_lo, rstd, [True] * 4)[0]
                coefficients = _parts.dx_coefficients(sums, count, affine, g, mean_lo, rstd)
                _parts.dx(torch.randn_like(x), x, g, affine, mean, mean_lo, rstd, *coefficients)
            print(f"{plan:>15} {dtype} {memory_format}: launched")
    return Counter(launch.name for launch in StandInDriver.launches)


# --- cached launch programs --------------------------------------------------------------------------


@contextlib.contextmanager
def replayed_allocations(pool: list):
    """The tensors a call allocates (torch.empty, empty_like, and the dense copies `contiguous` makes) are
    recorded into `pool` when it is empty and handed back from it, in order, when it is not: two runs of
    the same call get the same addresses."""
    real = torch.empty, torch.empty_like, torch.Tensor.contiguous
    replay = list(pool)

    def kept(t):
        if replay:
            return replay.pop(0)
        pool.append(t)
        return t

    def contiguous(self, *args, **kwargs):
        t = real[2](self, *args, **kwargs)
        return t if t is self else kept(t)

    torch.empty = lambda *args, **kwargs: kept(real[0](*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: kept(real[1](*args, **kwargs))
    torch.Tensor.contiguous = contiguous
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.contiguous = real


@contextlib.contextmanager
def counting_jit_runs(counter: list):
    real = JITFunction.run

    def run(self, *args, **kwargs):
        counter.append(self.__name__)
        return real(self, *args, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = real


def launches_of(call, pool: list, jit: bool) -> tuple[list, list]:
    """The launches `call` records (name, binary, warps, grid, arguments), with the allocations of `pool`,
    through JITFunction.run (jit) or the programs' compiled entries; and the JITFunction.run calls made."""
    from gn_triton import _compiled

    hooks_set = _compiled.hooks_set
    jit_runs: list = []
    StandInDriver.launches.clear()
    _compiled.hooks_set = (lambda: True) if jit else hooks_set  # a set hook sends every launch through JIT
    try:
        with replayed_allocations(pool), counting_jit_runs(jit_runs):
            call()
    finally:
        _compiled.hooks_set = hooks_set
    return [(r.name, r.binary, r.num_warps, r.grid, r.arguments) for r in StandInDriver.launches], jit_runs


PROGRAM_PLANS = [
    {},  # the planner's own (for an H100: fused or split as the shape asks)
    dict(split=1, groups_per_program=2, block_c=4, block_s=32),
    dict(split=3, groups_per_program=1, block_c=2, block_s=16, wave_blocks=0),
    dict(split=2, groups_per_program=2, block_c=4, block_s=16, wave_blocks=3),
    dict(split=2, groups_per_program=1, block_c=1, block_s=32, wave_blocks=0, chunks=2),
]


def random_call(rng: random.Random):
    """A random training or inference call: shape, groups, dtype, layout, view, epilogue, gradients."""
    import gn_triton

    n, g = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
    c = g * rng.choice([1, 2, 3, 4])
    spatial = rng.choice([(1,), (7,), (5, 6), (16, 16), (3, 4, 5)])
    if n * (c // g) * math.prod(spatial) == 1:  # torch refuses one value per group
        n = 2
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32, torch.float64])
    views = ["contiguous", "unaligned", "not dense"] + (["channels_last"] if len(spatial) == 2 else [])
    view = rng.choice(views)
    base = torch.randn(n + 1, c, *spatial, dtype=dtype) + 3
    x = {
        "contiguous": lambda: base[:n],
        "channels_last": lambda: base[:n].contiguous(memory_format=torch.channels_last),
        "unaligned": lambda: base.flatten()[1 : 1 + base[:n].numel()].view(n, c, *spatial),  # one element off
        "not dense": lambda: base.transpose(0, 1).contiguous().transpose(0, 1)[:n],  # (C, N, ...) in memory
    }[view]()
    weight = torch.randn(c, dtype=rng.choice([dtype, torch.float32])) if rng.random() < 0.7 else None
    bias = torch.randn(c, dtype=weight.dtype) if weight is not None and rng.random() < 0.8 else None
    modulated = rng.random() < 0.3
    scale, shift = (torch.randn(n, c, dtype=dtype), torch.randn(n, c, dtype=dtype)) if modulated else (None, None)
    activation = rng.choice([None, "silu", "gelu"])
    plan = rng.choice(PROGRAM_PLANS)
    tensors = [x, weight, bias, scale, shift]
    train = rng.random() < 0.6
    # Leaves where a gradient is asked for: detached views keep each tensor's strides and offset.
    tensors = [t.detach().requires_grad_() if t is not None and train and rng.random() < 0.8 else t for t in tensors]
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    dy = torch.randn(x.shape, dtype=dtype)
    label = (f"{tuple(x.shape)} G={g} {dtype} {view} w={weight is not None} b={bias is not None} "
             f"mod={modulated} act={activation} plan={plan or 'heuristic'} grads={len(leaves)}")  # fmt: skip

    def call():
        from gn_triton import _tuning

        with _tuning.override_plan(**plan) if plan else contextlib.nullcontext():
            y = gn_triton.group_norm(tensors[0], g, tensors[1], tensors[2], activation=activation,
                                     scale=tensors[3], shift=tensors[4])  # fmt: skip
            if leaves:
                torch.autograd.grad(y, leaves, dy)

    return label, call


def check_programs(cases: int, seed: int) -> None:
    """Each random call: its compiled-entry launches equal its JITFunction.run launches."""
    rng = random.Random(seed)
    for i in range(cases):
        label, call = random_call(rng)
        call()  # plans and compiles: the programs' first launches go through JITFunction.run
        pool: list = []
        compiled, jit_runs = launches_of(call, pool, jit=False)
        reference, _ = launches_of(call, pool, jit=True)
        if jit_runs:
            raise SystemExit(f"case {i} ({label}): the cached programs still called JITFunction.run: {jit_runs}")
        if compiled != reference:
            diff = next(j for j, (a, b) in enumerate(zip(compiled, reference)) if a != b) if compiled else 0
            raise SystemExit(f"case {i} ({label}): compiled entry and JITFunction.run differ at launch {diff}:\n"
                             f"  {compiled[diff] if compiled else None}\n  {reference[diff]}")  # fmt: skip
        print(f"program case {i}: {len(compiled)} launches equal: {label}")


def check_specialisation_changes() -> None:
    """A call after another with a different specialisation never launches the other's binary: each
    equals its own JITFunction.run launches."""
    import gn_triton

    base = torch.randn(2, 8, 40, 40, dtype=torch.bfloat16) + 3
    variants = {
        "aligned": base,
        "unaligned view (2-byte offset)": base.flatten()[1 : 1 + base.numel() // 2].view(1, 8, 40, 40),
        "aligned again, N = 1": base[:1],
        "S = 1": torch.randn(2, 8, 1, dtype=torch.bfloat16),
        "S = 16 (an integer divisible by 16)": torch.randn(2, 8, 16, dtype=torch.bfloat16),
        "C = 1 per group, G = C": torch.randn(2, 8, 33, dtype=torch.bfloat16),
    }
    binaries = {}
    for name, x in variants.items():
        groups = 8 if "G = C" in name else 4
        call = lambda x=x, groups=groups: gn_triton.group_norm(x, groups)  # noqa: E731
        call()
        pool: list = []
        compiled, _ = launches_of(call, pool, jit=False)
        reference, _ = launches_of(call, pool, jit=True)
        if compiled != reference:
            raise SystemExit(f"{name}: the cached program launched another specialisation's binary")
        binaries[name] = {launch[1] for launch in compiled}
        print(f"specialisation {name}: binaries {sorted(binaries[name])}, as JITFunction.run chooses")
    if binaries["aligned"] & binaries["unaligned view (2-byte offset)"]:
        raise SystemExit("an unaligned view launched the aligned view's binary")


def check_launch_hooks_take_the_jit_route() -> None:
    """With a launch hook installed (a profiler's), a cached program launches through JITFunction.run,
    which hands the hook its launch metadata; without one, through the compiled entries."""
    from triton import knobs

    import gn_triton

    x = torch.randn(2, 8, 24, dtype=torch.bfloat16)
    call = lambda: gn_triton.group_norm(x, 4)  # noqa: E731
    call()
    runs: list = []
    with counting_jit_runs(runs):
        call()
    if runs:
        raise SystemExit(f"a cached program without hooks went through JITFunction.run: {runs}")
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        with counting_jit_runs(runs):
            call()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    if not runs:
        raise SystemExit("a launch hook was set, yet the program launched through its compiled entries")
    print(f"launch hooks: with a hook set, {len(runs)} launch(es) through JITFunction.run; none without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="random calls for the cached-program check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    use(StandInDriver())
    print(f"triton {triton.__version__}, torch {torch.__version__}: launches through a stand-in sm_90 driver")
    check_harness_refuses()
    StandInDriver.launches.clear()
    launched = run_gn_triton()
    from gn_triton import _checks, _compiled, _launch

    missing = set(_launch.KERNELS) - set(launched)
    for name, count in sorted(launched.items()):
        print(f"{name}: {count} launches")
    if missing:
        raise SystemExit(f"kernels never launched: {sorted(missing)}")
    print(f"all {len(launched)} kernels launched")
    if not _compiled.convention_known():
        raise SystemExit(f"triton {triton.__version__}: the compiled kernels' calling convention is not recognised")
    _checks.INTERPRET = True  # CPU tensors take gn_triton's kernel path (compiled, through this driver)
    check_specialisation_changes()
    check_launch_hooks_take_the_jit_route()
    check_programs(args.cases, args.seed)
    print("cached programs: every call launched as JITFunction.run launches it")


if __name__ == "__main__":
    main()
