"""A compiled kernel's own entry: how triton's `JITFunction.run` hands a launch to the compiled kernel,
so that a cached launch program (gn_triton._launch) can make the same call without binding and
specialising its arguments again (what Inductor's generated launchers do).

The convention is read from the installed triton, not assumed from its version: `JITFunction.run`'s
source must end in the call below (triton 3.6, 3.7 and 3.9 do). Where it does not, or where a kernel
has pre-run hooks, or triton's launch hooks are set (profilers use them), `entry` gives None and the
program launches through `JITFunction.run` as before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# What JITFunction.run does with a compiled kernel once it has bound the arguments (whitespace removed).
_CALL = (
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())"
)


@functools.cache
def convention_known() -> bool:
    """Whether the installed triton launches a compiled kernel with exactly _CALL."""
    try:
        source = inspect.getsource(JITFunction.run)
    except (OSError, TypeError):
        return False
    return _CALL in "".join(source.split())


def hooks_set() -> bool:
    """Whether a launch hook is installed (a HookChain with calls, or a plain callable in an older
    triton): its launch metadata is then JITFunction.run's to build."""
    runtime = knobs.runtime
    return _installed(runtime.launch_enter_hook) or _installed(runtime.launch_exit_hook)


def _installed(hook) -> bool:
    return hook is not None and (hook.calls if type(hook) is HookChain else True)


def entry(
    kernel: JITFunction, compiled, grid: tuple[int, ...], args: tuple, constexprs: dict
) -> Callable[[tuple], None] | None:
    """A launcher of `compiled` (what `kernel[grid](*args, **constexprs)` returned) that takes a later
    call's positional arguments and launches on the current stream exactly as JITFunction.run would,
    or None where that cannot be promised (see the module docstring)."""
    if compiled is None or not isinstance(kernel, JITFunction) or kernel.pre_run_hooks or not convention_known():
        return None
    params = kernel.signature.parameters
    named = {name: value for name, value in constexprs.items() if name in params}  # the rest are launch options
    bound = kernel.signature.bind(*args, **named)
    bound.apply_defaults()  # what triton's binder does
    values = tuple(bound.arguments.values())
    if len(values) != len(params) or any(a is not b for a, b in zip(values, args)):
        return None
    tail = values[len(args) :]  # the constexprs, in the kernel's order
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream

    def launch(call_args: tuple) -> None:
        run(grid_x, grid_y, grid_z, stream(device), function, metadata, None, None, None, *call_args, *tail)

    return launch
