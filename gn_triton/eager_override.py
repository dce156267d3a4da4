"""Opt-in eager override: torch's own GroupNorm runs gn_triton's kernels, with no model edits.

    with gn_triton.enable_eager_override():        # or call it once; disable_eager_override() undoes
        y = model(x)       # every nn.GroupNorm, F.group_norm and torch.group_norm inside

nn.GroupNorm, F.group_norm and torch.group_norm all reach `aten::native_group_norm`, and autograd
differentiates it with `aten::native_group_norm_backward`. While enabled, both ops have a kernel of
ours at the backend dispatch key (CUDA; also CPU under TRITON_INTERPRET=1) that runs gn_triton's launch
programs (gn_triton._launch: already below autograd, it needs no custom op's dispatch) for every call
they support and hands any other call, unchanged, to the ATen kernel that was there before. Being a
backend kernel, it sits below autograd and autocast: ATen's derivative formula and
autocast's casts run as always, and the saved statistics are ATen's (N, G) mean and rstd, in the
dtype ATen gives them (the input's; on the CPU fp32 for 16-bit input with fp32 weight or bias).

Where torch has it (2.13) the kernels go through `torch._native`'s override registry, the route
PyTorch's own DSL kernels use (it also composes with other overrides of these ops); elsewhere (2.11)
through the same mechanism by hand: `torch.library.get_kernel` captures the ATen kernel for the
fall-through and an "IMPL" `torch.library.Library` holds the router, destroyed on disable.

What falls through to ATen (see `_forward_supported` / `_backward_supported`): tensors gn_triton
does not run on, other dtypes or mixes of dtypes and devices, inputs that are not dense in their
memory format (channels_last on the CPU only: on CUDA, group_norm passes contiguous input), empty
inputs (N = 0 or an empty spatial extent: nothing to compute, and ATen's statistics of them are its
own), a backward asked for weight or bias gradients without a weight (ATen raises there), and any
argument ATen would reject, so the error is ATen's.

The backward's price for ATen's statistics: gn_triton keeps the mean as an fp32 pair (mean, mean_lo)
so that mean-shifted data normalises exactly; ATen saves one rounded mean. The backward recovers the
pair by running the forward's statistics again (one extra read of x and one x-sized scratch write:
for a bandwidth-bound backward that reads x and dy and writes dx, up to about 5/3 of its time). rstd is
used as saved: `native_group_norm_backward` has no eps. From the override's forward it is gn_triton's
own; a 16-bit rstd (16-bit input without fp32 parameters), or ATen's rstd when ATen ran the forward,
is taken as ATen's own backward takes it, with its rounding or error.

torch.compile, CUDA graphs recorded by Inductor and torch.export trace the ATen ops with fake tensors
and never reach a backend kernel: Inductor lowers group_norm itself (enable_compile_fusion() swaps in
gn_triton's op there). A converted model (convert_model) calls gn_triton's ops directly, never
`aten::native_group_norm`, so the override does no double work there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks, _launch, _ops
from ._launch import stats_dtype
from ._plan import Affine, memory_format
from ._switch import Switch

_DSL_NAME = _ops.NAMESPACE  # our name in torch._native's registry (a hub copy has its own)
_HALF = (torch.float16, torch.bfloat16)


def _dispatch_keys() -> tuple[str, ...]:
    # torch.backends.cuda.is_built(), not torch.cuda.is_available(): the latter initialises CUDA.
    return (("CUDA",) if torch.backends.cuda.is_built() else ()) + (("CPU",) if _checks.INTERPRET else ())


def _stats_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype | None:
    """The dtype ATen gives mean and rstd (x's; fp32 for 16-bit x with fp32 parameters), or None
    where ATen rejects the mix of dtypes: its CPU kernel takes fp32 parameters with 16-bit input, its
    CUDA kernel no mix at all."""
    dtypes = {p.dtype for p in params if p is not None}
    if dtypes <= {x.dtype}:
        return x.dtype
    mixed = x.device.type == "cpu" and x.dtype in _HALF and dtypes == {torch.float32}
    return torch.float32 if mixed else None


def _input_supported(x: torch.Tensor, N: int, C: int, HxW: int, group: int, params) -> bool:
    """x is an (N, C, *) tensor with HxW spatial elements that gn_triton runs on, dense the way
    ATen's kernel takes it, and its parameters are (C,) tensors on its device in a mix of dtypes ATen
    accepts."""
    if not (x.dtype in _checks.SUPPORTED_DTYPES and _checks.runs_on_kernels(x) and x.numel() > 0 and x.dim() >= 2):
        return False
    if tuple(x.shape[:2]) != (N, C) or math.prod(x.shape[2:]) != HxW or group <= 0 or C % group:
        return False
    if not (x.is_contiguous() or (x.device.type == "cpu" and x.is_contiguous(memory_format=memory_format(x)))):
        return False
    if _stats_dtype(x, *params) is None:
        return False
    return all(p is None or (p.device == x.device and tuple(p.shape) == (C,)) for p in params)


def _forward_supported(input, weight, bias, N, C, HxW, group, eps) -> bool:
    return _input_supported(input, N, C, HxW, group, (weight, bias))


def _forward(input, weight, bias, N, C, HxW, group, eps):
    """aten::native_group_norm: (y, mean, rstd), the statistics (N, G) in ATen's dtype."""
    y, mean, _mean_lo, rstd = _launch.gn_fwd(input, group, float(eps), Affine(weight, bias))
    dtype = _stats_dtype(input, weight, bias)
    return y, mean.to(dtype), rstd.to(dtype)


def _backward_supported(grad_out, input, mean, rstd, weight, N, C, HxW, group, output_mask) -> bool:
    if not _input_supported(input, N, C, HxW, group, (weight,)):
        return False
    if weight is None and (output_mask[1] or output_mask[2]):
        return False  # ATen raises on this call: let it
    dtype = _stats_dtype(input, weight)
    stats_ok = all(
        s.dtype == dtype and s.device == input.device and s.numel() == N * group and s.is_contiguous()
        for s in (mean, rstd)
    )
    same = grad_out.shape == input.shape and grad_out.dtype == input.dtype and grad_out.device == input.device
    return stats_ok and same


def _mean_pair(input: torch.Tensor, group: int, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's saved mean as the kernels' pair (mean_hi, mean_lo) in the accumulation dtype.

    mean_lo is what a single rounded mean loses: the statistics pass is run again and mean_lo is the
    distance from the saved mean to the exact one. It is applied only where the saved mean is within
    its dtype's precision of the exact one (always so for a mean a forward of this input computed); a
    mean from elsewhere is used as given, as ATen's backward uses it."""
    acc = stats_dtype(input)
    # eps does not enter the mean; 1.0 keeps the discarded rstd and output finite
    _y, exact_hi, exact_lo, _rstd = _launch.gn_fwd(input, group, 1.0, Affine(None, None))
    mean_hi = mean.reshape(exact_hi.shape).to(acc)
    residual = (exact_hi - mean_hi) + exact_lo  # exact_hi - mean_hi is exact when they are close
    rounded = residual.abs() <= torch.finfo(mean.dtype).eps * mean_hi.abs()
    return mean_hi, torch.where(rounded, residual, torch.zeros_like(residual))


def _backward(grad_out, input, mean, rstd, weight, N, C, HxW, group, output_mask):
    """aten::native_group_norm_backward: (dx, dweight, dbias), None where output_mask is False."""
    if not any(output_mask):
        return None, None, None
    mean_hi, mean_lo = _mean_pair(input, group, mean)
    rstd = rstd.reshape(mean_hi.shape).to(mean_hi.dtype)
    # dbias is Σ dy whatever the bias was: weight stands in for it (same shape and dtype, never read)
    bias = weight if output_mask[2] else None
    mask = [*output_mask, False, False]
    grads = _launch.gn_bwd(grad_out, input, group, Affine(weight, bias), mean_hi, mean_lo, rstd, mask)
    return tuple(g if needed else None for g, needed in zip(grads[:3], output_mask))


_OVERRIDES: dict[str, tuple[Callable[..., bool], Callable]] = {
    "native_group_norm": (_forward_supported, _forward),
    "native_group_norm_backward": (_backward_supported, _backward),
}


def _native_registry() -> Any:
    """torch._native's override registry where this torch has it (2.13+), else None."""
    try:
        from torch._native import registry
    except ImportError:
        return None
    needed = ("register_op_override", "reenable_op_overrides", "deregister_op_overrides")
    return registry if all(hasattr(registry, name) for name in needed) else None


class _NativeRoute:
    """Through torch._native: our nodes are added to its graphs once, then enabled and disabled by
    our DSL name (other overrides of the same ops keep working)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.added = False

    def install(self) -> None:
        if not self.added:
            for op, (cond, impl) in _OVERRIDES.items():
                for key in _dispatch_keys():
                    self.registry.register_op_override(_DSL_NAME, "aten", op, key, cond, impl)
            self.added = True
        self.registry.reenable_op_overrides(enable_dsl_names=_DSL_NAME)

    def uninstall(self) -> None:
        self.registry.deregister_op_overrides(disable_dsl_names=_DSL_NAME)


class _LibraryRoute:
    """Through torch.library: per op and key, capture the kernel there and install a router that
    calls ours when its predicate holds and the captured kernel otherwise; destroying the library
    puts the captured kernel back."""

    def __init__(self) -> None:
        self.libraries: list[torch.library.Library] = []

    def install(self) -> None:
        for op, (cond, impl) in _OVERRIDES.items():
            for key in _dispatch_keys():
                fallback = torch.library.get_kernel(f"aten::{op}", key)
                library = torch.library.Library("aten", "IMPL", key)
                library.impl(op, _router(cond, impl, fallback), key, with_keyset=True)
                self.libraries.append(library)

    def uninstall(self) -> None:
        while self.libraries:
            self.libraries.pop()._destroy()


def _router(cond: Callable[..., bool], impl: Callable, fallback: Any) -> Callable:
    def router(keyset, *args, **kwargs):
        if cond(*args, **kwargs):
            return impl(*args, **kwargs)
        return fallback.call_boxed(keyset, *args, **kwargs)

    return router


_registry = _native_registry()
_route = _NativeRoute(_registry) if _registry is not None else _LibraryRoute()
_enabled = False


def _set_enabled(enabled: bool) -> None:
    global _enabled
    if enabled == _enabled:
        return
    with warnings.catch_warnings():
        # Replacing ATen's kernel at a key is the point: not worth torch's "Overriding a previously
        # registered kernel" warning.
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*", category=UserWarning)
        if enabled:
            _route.install()
        else:
            _route.uninstall()
    _enabled = enabled


def _switch(enabled: bool) -> Switch:
    return Switch(lambda: _enabled, _set_enabled, lambda: _set_enabled(enabled))


def enable_eager_override() -> Switch:
    """Run every aten::native_group_norm and its backward that gn_triton supports on gn_triton's
    kernels (nn.GroupNorm, F.group_norm, torch.group_norm, no model edits); other calls run ATen's
    kernel unchanged. See gn_triton.eager_override. Idempotent; `with enable_eager_override():`
    enables it for the block only."""
    return _switch(True)


def disable_eager_override() -> Switch:
    """Undo enable_eager_override: ATen's kernels again. Idempotent; also a context manager
    (disabled inside the block)."""
    return _switch(False)
