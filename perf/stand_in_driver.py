"""A stand-in CUDA driver for Triton: the real JIT launch path on a machine without a GPU.

Triton's binder, specialisation, kernel cache and compilation (the wheel's ptxas, to a cubin) run as
on a GPU host; the driver reports an sm_90 target with an H100's properties, accepts the cubin where
the real driver would load it, and its launcher stands in for the C launcher:

- `StandInDriver(check=True)`: each launch's arguments are checked against the compiled signature as
  the C launcher reads them (a pointer needs a tensor or an address, i32 an int in range, fp32 a
  float; constexprs are skipped) and the launch is recorded (`StandInDriver.launches`): the launch
  path harness (tests/launch_path.py) and the cached-program tests use it;
- `StandInDriver(check=False)`: the launcher does nothing at all, so that a process's CPU time is the
  host path alone: Python, torch's dispatcher, Triton's launch machinery (perf/host_report.py).

    from perf.stand_in_driver import StandInDriver, use
    use(StandInDriver())   # before the first launch; TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

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


def _address(value):
    """A pointer argument as the launcher reads it: a tensor's address, an int as given."""
    return value.data_ptr() if hasattr(value, "data_ptr") else value


class Launch:
    """One recorded launch: the kernel's name and compiled binary, warps, grid, and the arguments as
    the launcher reads them (pointers as addresses, constexprs as given)."""

    def __init__(self, name, binary, num_warps, grid, arguments) -> None:
        self.name, self.binary, self.num_warps, self.grid, self.arguments = name, binary, num_warps, grid, arguments

    def __repr__(self) -> str:
        return f"Launch({self.name}, grid={self.grid}, warps={self.num_warps})"


class _CheckingLauncher:
    """Built by CompiledKernel for its first launch, like the driver's launcher; checks and records."""

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
        arguments = tuple(
            value if ty == "constexpr" else _address(value) if isinstance(ty, str) and ty.startswith("*") else value
            for ty, value in zip(self.signature.values(), args)
        )
        StandInDriver.launch_count += 1
        StandInDriver.launches.append(
            Launch(self.name, function, self.metadata.num_warps, (grid_x, grid_y, grid_z), arguments)
        )


class _IdleLauncher:
    """A launcher that only counts: the host path's cost without a GPU's."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args) -> None:
        StandInDriver.launch_count += 1


class _Utils:
    def __init__(self) -> None:
        self.functions = 0

    def load_binary(self, name, kernel, shared, device):
        if not kernel.startswith(b"\x7fELF"):
            raise RuntimeError(f"{name}: the compiled kernel is not a cubin")
        self.functions += 1  # a distinct handle per loaded binary, as the real driver gives
        return 1, self.functions, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        # An H100's: 228 KiB of shared memory per SM, 227 KiB usable by one block.
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "warpSize": 32}

    def unload_module(self, module) -> None:
        pass


class StandInDriver:
    """Triton's driver interface for an sm_90 device that is not there (see the module docstring)."""

    launches: list[Launch] = []  # what a checking launcher recorded
    launch_count = 0  # launches of either launcher

    def __init__(self, check: bool = True) -> None:
        self.utils = _Utils()
        self.launcher_cls = _CheckingLauncher if check else _IdleLauncher

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def use(stand_in: StandInDriver) -> None:
    """Make `stand_in` Triton's active driver (before any kernel is launched in this process)."""
    driver.set_active(stand_in)
