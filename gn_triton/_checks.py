"""What the public API accepts, and where a call runs: argument checks that raise torch's exception
types (naming the argument and its values), the supported dtypes and activations, whether a tensor
runs on gn_triton's kernels (CUDA, or the CPU under Triton's interpreter) or falls back to torch
(backend_for), and the output dtype under autocast (autocast_dtype)."""

from __future__ import annotations

import math
import operator
import os

import torch

from . import _activations

# Read once at import (no device is touched): Triton decides at decoration time whether the kernels
# are compiled or interpreted, so this cannot change later in the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Fused activations by name, as the kernels' ACTIVATION constexpr.
ACTIVATIONS = {None: 0} | {name: a.number for name, a in _activations.ACTIVATIONS.items()}


def runs_on_kernels(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors too when Triton interprets them."""
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def backend_for(input: torch.Tensor) -> str:
    """Which implementation gn_triton.group_norm (and GroupNorm) runs for `input`:
    "kernels": gn_triton's compiled Triton kernels (CUDA tensors of a supported dtype);
    "interpreter": the same kernels in Triton's interpreter (CPU tensors, TRITON_INTERPRET=1 set
        before gn_triton was imported);
    "torch": torch's own group_norm, with gn_triton's epilogue in torch ops (any other device, a CPU
        without the interpreter, or a dtype the kernels do not take).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"backend_for(): input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in SUPPORTED_DTYPES or not runs_on_kernels(input):
        return "torch"
    return "kernels" if input.is_cuda else "interpreter"


# Devices whose autocast runs group_norm in fp32 (torch's autocast op lists: CUDA's "fp32" list holds
# group_norm, the CPU's does not, so CPU autocast leaves it in the input's dtype).
AUTOCAST_FP32_DEVICES = ("cuda",)


def autocast_dtype(dtype: torch.dtype, device_type: str, autocast_enabled: bool) -> torch.dtype:
    """group_norm's output dtype, by torch's rule, for input of `dtype` on `device_type` with that
    device's autocast on or off: fp32 for 16-bit input where autocast runs group_norm in fp32 (it
    casts 16-bit tensors to fp32; fp64 and fp32 are left alone), else the input's dtype."""
    if autocast_enabled and device_type in AUTOCAST_FP32_DEVICES and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def output_dtype(input: torch.Tensor) -> torch.dtype:
    """autocast_dtype under the autocast state of input's device now."""
    if input.dtype not in (torch.float16, torch.bfloat16):  # the only dtypes autocast changes (the common case)
        return input.dtype
    device_type = input.device.type
    if device_type not in AUTOCAST_FP32_DEVICES:  # the only ones that change it; meta has no autocast state to ask
        return input.dtype
    return autocast_dtype(input.dtype, device_type, torch.is_autocast_enabled(device_type))


def as_number(value, kind: type):
    """num_groups (kind int) or eps (kind float) as torch's group_norm takes them: an integer that is not
    an int (numpy's, a 0-d integer tensor) as an int; a real number as a float. Anything else is returned
    as it is, for check_group_norm_args to refuse in torch's order."""
    if isinstance(value, (bool, str, bytes)):
        return value
    try:
        return operator.index(value) if kind is int else float(value)
    except (TypeError, ValueError, RuntimeError):
        return value


def check_group_norm_args(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    whole: bool = True,
) -> None:
    """Raise the exception type torch's group_norm raises for the same bad input, in torch's order (its
    Python checks, then argument types, then the C++ checks: tests/test_api.py has the table of combined
    bad inputs), with a message that names the argument and its values (docs/drop-in.md). One exception:
    input that is not a tensor is a TypeError (torch fails on it with an AttributeError). whole=False: x
    is a piece of the tensor normalised (gn_triton.stats, a shard), which may hold a single value per
    group."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm(): input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise RuntimeError(
            f"group_norm(): expected input with at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}"
        )
    if whole:
        # torch.nn.functional.group_norm's first check, in Python: N*C // num_groups values per channel
        # and position, which divides by num_groups before anything looks at its type or sign.
        try:
            values = x.shape[0] * x.shape[1] // num_groups * math.prod(x.shape[2:])
        except ZeroDivisionError:
            raise ZeroDivisionError(f"group_norm(): num_groups must be positive, got num_groups={num_groups}") from None
        except TypeError:
            raise TypeError(f"group_norm(): num_groups must be an int, got {type(num_groups).__name__}") from None
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"group_norm(): num_groups must be an int, got {type(num_groups).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"group_norm(): eps must be a float, got {type(eps).__name__}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and not isinstance(param, torch.Tensor):
            raise TypeError(f"group_norm(): {name} must be a Tensor or None, got {type(param).__name__}")
    channels = x.shape[1]
    if num_groups == 0:
        raise ZeroDivisionError(f"group_norm(): num_groups must be positive, got num_groups={num_groups}")
    if num_groups < 0:
        raise RuntimeError(f"group_norm(): num_groups must be positive, got num_groups={num_groups}")
    if channels % num_groups != 0:
        raise RuntimeError(
            f"group_norm(): expected number of channels in input to be divisible by num_groups, "
            f"but got input of shape {tuple(x.shape)} and num_groups={num_groups}"
        )
    vector = f"a vector of size equal to the number of channels in input ({channels})"
    for name, param in (("weight", weight), ("bias", bias)):
        _check_optional(x, name, param, (channels,), vector)
    if not x.is_floating_point():
        # torch's kernels have no integer, bool or complex instance: NotImplementedError
        raise NotImplementedError(f"group_norm(): input must be a floating point tensor, got dtype {x.dtype}")


def _check_optional(x: torch.Tensor, name: str, t, shape: tuple, wanted: str) -> None:
    """An optional tensor argument: None, or a floating tensor of `shape` (`wanted`) on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm(): {name} must be a Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise RuntimeError(f"group_norm(): expected {name} to be {wanted}, but got {name} of shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise RuntimeError(f"group_norm(): {name} must be a floating point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(
            f"group_norm(): expected all tensors to be on the same device, but got input on {x.device} "
            f"and {name} on {t.device}"
        )


def check_activation(activation: str | None) -> int:
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"group_norm(): unknown activation={activation!r}; expected one of {names}")
    return ACTIVATIONS[activation]


def check_modulation(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """scale and shift, when given, are floating (N, C) tensors on x's device."""
    rows = tuple(x.shape[:2])
    for name, t in (("scale", scale), ("shift", shift)):
        _check_optional(x, name, t, rows, f"of shape (N, C) = {rows}")
