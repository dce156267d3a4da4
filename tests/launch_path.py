"""Triton's real launch path without a GPU: `python tests/launch_path.py` (TRITON_INTERPRET unset).

What only a GPU run exercised before: triton's binder (argument binding and specialisation: integer
values of 1 and multiples of 16, pointer alignment), the kernel cache key (with the Epilogue/Layout
NamedTuple constexprs), compilation to a cubin by the wheel's ptxas, and the hand-off to the launcher.
A fake CUDA driver stands in for the real one: it reports an sm_90 target, accepts the cubin (an ELF
file) where the real driver would load it, and its launcher checks each argument against the compiled
kernel's signature as the C launcher parses them (a pointer needs a tensor's data_ptr, i32 an int in
range, fp32 a float; constexprs are dropped) and records the launch instead of running it.

Every kernel of a fused and a split plan runs through it (forward, and backward with every gradient,
with a fused activation and per-sample scale/shift), under whatever triton is installed. It prints one
line per kernel launched and exits non-zero on any failure; tests/test_launch_path.py runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("launch_path.py drives compiled kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

INT_RANGES = {
    "i1": (0, 1), "i8": (-(2**7), 2**7 - 1), "i16": (-(2**15), 2**15 - 1), "i32": (-(2**31), 2**31 - 1),
    "i64": (-(2**63), 2**63 - 1), "u1": (0, 1), "u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1),
    "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1),
}  # fmt: skip
FLOATS = {"fp16", "bf16", "fp32", "f32", "fp64"}


class LaunchError(TypeError):
    """An argument the C launcher would refuse (or mis-read) for the compiled signature."""


def check_argument(name: str, ty, value) -> None:
    """`value` as the launcher would read it for signature type `ty` (nested for tuple arguments)."""
    if isinstance(ty, tuple):  # a tuple argument: one type per element
        if not isinstance(value, tuple) or len(value) != len(ty):
            raise LaunchError(f"{name}: expected a tuple of {len(ty)}, got {value!r}")
        for i, (t, v) in enumerate(zip(ty, value)):
            check_argument(f"{name}[{i}]", t, v)
    elif ty == "constexpr":
        return  # baked into the cubin; the launcher skips it
    elif ty.startswith("*"):
        if not (hasattr(value, "data_ptr") or value is None or isinstance(value, int)):
            raise LaunchError(f"{name}: pointer argument ({ty}) needs a tensor, got {type(value).__name__}")
    elif ty in INT_RANGES:
        low, high = INT_RANGES[ty]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise LaunchError(f"{name}: {ty} argument out of range or not an int: {value!r}")
    elif ty in FLOATS:
        if not isinstance(value, (float, int)) or isinstance(value, bool):
            raise LaunchError(f"{name}: {ty} argument needs a float, got {value!r}")
    else:
        raise LaunchError(f"{name}: signature type {ty!r} unknown to this check")


class FakeLauncher:
    """Built by CompiledKernel for its first launch, like the driver's launcher; records launches."""

    def __init__(self, src, metadata) -> None:
        self.name = src.fn.__name__
        self.signature = dict(src.signature)
        self.metadata = metadata

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *rest) -> None:
        # rest: (kernel metadata, launch metadata, enter hook, exit hook, *the bound arguments)
        args = rest[4:]
        if len(args) != len(self.signature):
            raise LaunchError(f"{self.name}: {len(args)} arguments for a signature of {len(self.signature)}")
        for (name, ty), value in zip(self.signature.items(), args):
            check_argument(f"{self.name}.{name}", ty, value)
        if min(grid_x, grid_y, grid_z) < 1 or grid_y > 65535 or grid_z > 65535 or grid_x > 2**31 - 1:
            raise LaunchError(f"{self.name}: grid ({grid_x}, {grid_y}, {grid_z}) out of CUDA's limits")
        FakeCudaDriver.launches.append((self.name, self.metadata.num_warps, (grid_x, grid_y, grid_z)))


class FakeUtils:
    def load_binary(self, name, kernel, shared, device):
        if not kernel.startswith(b"\x7fELF"):
            raise RuntimeError(f"{name}: the compiled kernel is not a cubin")
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        # An H100's: 228 KiB of shared memory per SM, 227 KiB usable by one block.
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "warpSize": 32}

    def unload_module(self, module) -> None:
        pass


class FakeCudaDriver:
    launches: list = []

    def __init__(self) -> None:
        self.utils = FakeUtils()
        self.launcher_cls = FakeLauncher

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


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
    return Counter(name for name, _warps, _grid in FakeCudaDriver.launches)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    driver.set_active(FakeCudaDriver())
    print(f"triton {triton.__version__}, torch {torch.__version__}: launches through a fake sm_90 driver")
    check_harness_refuses()
    FakeCudaDriver.launches.clear()
    launched = run_gn_triton()
    from gn_triton import _launch

    missing = set(_launch.KERNELS) - set(launched)
    for name, count in sorted(launched.items()):
        print(f"{name}: {count} launches")
    if missing:
        raise SystemExit(f"kernels never launched: {sorted(missing)}")
    print(f"all {len(launched)} kernels launched")


if __name__ == "__main__":
    main()
