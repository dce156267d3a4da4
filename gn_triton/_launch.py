"""Host side of the kernels: argument checks, layout, allocation, plan choice and launches.

`gn_fwd` and `gn_bwd` are the only entry points the ops layer uses. A `Plan` says how a problem is
cut into programs; `gn_triton._tuning` chooses it (heuristic or autotuned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from . import _tuning
from ._tuning import INTERPRET, Plan, Problem
from .kernels import (
    _gn_bwd_dparams_kernel,
    _gn_bwd_dscale_shift_kernel,
    _gn_bwd_fused_kernel,
    _gn_bwd_partial_sums_kernel,
    _gn_bwd_split_dx_kernel,
    _gn_fwd_fused_kernel,
    _gn_fwd_partial_stats_kernel,
    _gn_fwd_split_apply_kernel,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Fused activations by name, as the kernels' ACTIVATION constexpr.
ACTIVATIONS = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
_INT32_MAX = 2**31 - 1


def runs_on_kernels(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors too when Triton interprets them."""
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def check_group_norm_args(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    """Raise like torch does (RuntimeError/TypeError/ValueError naming the argument) on bad input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm(): input must be a Tensor, got {type(x).__name__}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"group_norm(): num_groups must be an int, got {type(num_groups).__name__}")
    if x.dim() < 2:
        raise RuntimeError(
            f"group_norm(): expected input with at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"group_norm(): input must be a floating point tensor, got dtype {x.dtype}")
    channels = x.shape[1]
    if num_groups <= 0:
        raise ValueError(f"group_norm(): num_groups must be positive, got num_groups={num_groups}")
    if channels % num_groups != 0:
        raise RuntimeError(
            f"group_norm(): expected number of channels in input to be divisible by num_groups, "
            f"but got input of shape {tuple(x.shape)} and num_groups={num_groups}"
        )
    if x.numel() and x.shape[0] * (channels // num_groups) * math.prod(x.shape[2:]) == 1:
        # torch.nn.functional.group_norm refuses this degenerate case too, with the same error.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"group_norm(): {name} must be a Tensor or None, got {type(param).__name__}")
        if param.dim() != 1 or param.numel() != channels:
            raise RuntimeError(
                f"group_norm(): expected {name} to be a vector of size equal to the number of channels "
                f"in input ({channels}), but got {name} of shape {tuple(param.shape)}"
            )
        if not param.is_floating_point():
            raise TypeError(f"group_norm(): {name} must be a floating point tensor, got dtype {param.dtype}")
        if param.device != x.device:
            raise RuntimeError(
                f"group_norm(): expected all tensors to be on the same device, but got input on "
                f"{x.device} and {name} on {param.device}"
            )


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of group_norm's output for `x`: torch's suggestion from x's stride order, so
    channels_last (also a sliced channels_last view) stays channels_last, as with torch's kernel."""
    return suggest_memory_format(x)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_activation(activation: str | None) -> int:
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"group_norm(): unknown activation={activation!r}; expected one of {names}")
    return ACTIVATIONS[activation]


def check_modulation(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """scale and shift, when given, are floating (N, C) tensors on x's device."""
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"group_norm(): {name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != tuple(x.shape[:2]):
            raise RuntimeError(
                f"group_norm(): expected {name} of shape (N, C) = {tuple(x.shape[:2])}, got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"group_norm(): {name} must be a floating point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(
                f"group_norm(): expected all tensors to be on the same device, but got input on {x.device} "
                f"and {name} on {t.device}"
            )


@dataclass
class Affine:
    """What follows the normalisation: y = act((x_hat*weight + bias)*(1 + scale) + shift). weight
    and bias are (C,), scale and shift per sample (N, C); each may be None."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    activation: str | None = None

    def pointers(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(weight, bias, scale, shift) for a launch; the placeholder stands in for an absent one
        (its kernel flag is off, so it is never read)."""
        return tuple(placeholder if t is None else t for t in (self.weight, self.bias, self.scale, self.shift))


def _problem(x: torch.Tensor, num_groups: int, affine: Affine) -> Problem:
    return Problem(
        N=x.shape[0],
        C=x.shape[1],
        S=math.prod(x.shape[2:]),
        G=num_groups,
        dtype=x.dtype,
        channels_last=memory_format(x) != torch.contiguous_format,
        has_weight=affine.weight is not None,
        has_bias=affine.bias is not None,
        has_scale=affine.scale is not None,
        has_shift=affine.shift is not None,
        activation=check_activation(affine.activation),
    )


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`t` laid out densely in `fmt` (no copy when it already is; stride-0 gradients get one)."""
    return t.contiguous(memory_format=fmt)


def _kernel_flags(x: torch.Tensor, problem: Problem) -> dict:
    """The constexpr flags every normalising kernel takes."""
    return dict(
        HAS_WEIGHT=problem.has_weight,
        HAS_BIAS=problem.has_bias,
        HAS_SCALE=problem.has_scale,
        HAS_SHIFT=problem.has_shift,
        ACTIVATION=problem.activation,
        CHANNELS_LAST=problem.channels_last,
        INDEX_64=x.numel() > _INT32_MAX,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )


def _merge_step(split: int) -> int:
    """Spans merged per step when a program reads its block's partials: few enough to keep the
    merge tile small in registers."""
    return min(triton.next_power_of_2(split), 16)


def _base_flags(flags: dict) -> dict:
    """The flags of the kernels that only read x (partial statistics): layout, indexing, accumulator."""
    return {k: flags[k] for k in ("CHANNELS_LAST", "INDEX_64", "ACC")}


def _modulation(affine: Affine) -> Affine:
    """scale/shift as dense (N, C) rows (tiny: a copy only if a view was passed)."""
    scale = None if affine.scale is None else affine.scale.contiguous()
    shift = None if affine.shift is None else affine.shift.contiguous()
    return Affine(affine.weight, affine.bias, scale, shift, affine.activation)


def empty_outputs(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    """The forward's outputs, unfilled: y (x's dtype and memory format) and (N, G) mean, mean_lo and
    rstd in the statistics dtype. The one allocation of the real op and its fake implementation."""
    y = torch.empty_like(x, memory_format=memory_format(x))
    stats = (torch.empty((x.shape[0], num_groups), dtype=stats_dtype(x), device=x.device) for _ in range(3))
    return (y, *stats)


def empty_grads(x: torch.Tensor, affine: Affine, output_mask: Sequence[bool]) -> tuple[torch.Tensor, ...]:
    """The backward's outputs, unfilled: (dx, dweight, dbias, dscale, dshift) like their tensors (dx in
    x's memory format); one not asked for in `output_mask`, or of a tensor that is None, is empty.
    The one allocation of the real op and its fake implementation."""
    fmt = memory_format(x)
    return tuple(
        (torch.empty_like(t, memory_format=fmt) if t is x else torch.empty_like(t))
        if need and t is not None
        else x.new_empty(0)
        for need, t in zip(output_mask, (x, affine.weight, affine.bias, affine.scale, affine.shift))
    )


def gn_fwd(
    x: torch.Tensor, num_groups: int, eps: float, affine: Affine
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm forward with what follows it (`affine`). Returns (y, mean, mean_lo, rstd); the stats
    are (N, G) in fp32 (fp64 for fp64 input), mean is the group mean rounded to that dtype and
    mean_lo the rounding residual."""
    y, mean, mean_lo, rstd = empty_outputs(x, num_groups)
    problem = _problem(x, num_groups, affine)
    if y.numel() == 0:
        # Like torch: an empty group has NaN statistics.
        for t in (mean, mean_lo, rstd):
            t.fill_(float("nan"))
        return y, mean, mean_lo, rstd
    x = _dense(x, memory_format(x))
    affine = _modulation(affine)

    def launch(plan: Plan) -> None:
        _launch_fwd(x, y, affine, mean, mean_lo, rstd, eps, problem, plan)

    launch(_tuning.choose_plan("fwd", problem, x.device, launch))
    return y, mean, mean_lo, rstd


def _launch_fwd(x, y, affine: Affine, mean, mean_lo, rstd, eps, p: Problem, plan: Plan) -> None:
    flags = _kernel_flags(x, p)
    w, b, scale, shift = affine.pointers(x)
    blocks = dict(R=plan.groups_per_program, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    if plan.split == 1:
        _gn_fwd_fused_kernel[(plan.blocks(p),)](
            x, y, w, b, scale, shift, mean, mean_lo, rstd, p.C, p.S, p.G, p.Cg, eps, **blocks, **flags
        )
        return
    span, split = plan.span(p.S)
    partials = torch.empty((p.rows, split, 3), dtype=mean.dtype, device=x.device)
    for offset, count in plan.waves(p):
        _gn_fwd_partial_stats_kernel[(count, split)](
            x, partials, offset, p.C, p.S, p.G, p.Cg, span, split, **blocks, **_base_flags(flags)
        )
        _gn_fwd_split_apply_kernel[(count, split)](
            x, y, w, b, scale, shift, partials, mean, mean_lo, rstd, offset, p.C, p.S, p.G, p.Cg, span, split,
            eps, BLOCK_SPLIT=_merge_step(split), **blocks, **flags,
        )  # fmt: skip


def gn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    affine: Affine,
    mean: torch.Tensor,
    mean_lo: torch.Tensor,
    rstd: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, ...]:
    """Backward of gn_fwd: (dx, dweight, dbias, dscale, dshift). A gradient not asked for in
    `output_mask`, or of a tensor that is None, comes back as an empty tensor and costs nothing."""
    grads = empty_grads(x, affine, output_mask)
    if x.numel() == 0:
        for g in grads[1:]:
            g.zero_()
        return grads
    needs = tuple(g.numel() > 0 for g in grads)  # x is not empty, so neither is any tensor it has a gradient of
    if not any(needs):
        return grads
    fmt = memory_format(x)
    x = _dense(x, fmt)
    grad_out = _dense(grad_out, fmt)
    affine = _modulation(affine)
    problem = _problem(x, num_groups, affine)

    def launch(plan: Plan) -> None:
        _launch_bwd(grad_out, x, affine, mean, mean_lo, rstd, grads, problem, plan)

    launch(_tuning.choose_plan("bwd", problem, x.device, launch, needs=needs))
    return grads


def _launch_bwd(dy, x, affine: Affine, mean, mean_lo, rstd, grads, p: Problem, plan: Plan) -> None:
    dx, dw, db, dscale, dshift = (g if g.numel() else x for g in grads)  # placeholders where not needed
    needs_dx, needs_dw, needs_db, needs_dscale, needs_dshift = (g.numel() > 0 for g in grads)
    flags = _kernel_flags(x, p)
    w, b, scale, shift = affine.pointers(x)
    blocks = dict(R=plan.groups_per_program, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    needs_partials = needs_dw or needs_db or needs_dscale or needs_dshift
    if plan.split == 1:
        split = 1
        partials = torch.empty((p.N, p.C, 1, 2), dtype=mean.dtype, device=x.device) if needs_partials else x
        _gn_bwd_fused_kernel[(plan.blocks(p),)](
            x, dy, dx, w, b, scale, shift, mean, mean_lo, rstd, partials, p.C, p.S, p.G, p.Cg,
            NEEDS_DX=needs_dx, NEEDS_PARTIALS=needs_partials, **blocks, **flags,
        )  # fmt: skip
    else:
        span, split = plan.span(p.S)
        partials = torch.empty((p.N, p.C, split, 2), dtype=mean.dtype, device=x.device)
        for offset, count in plan.waves(p):
            _gn_bwd_partial_sums_kernel[(count, split)](
                x, dy, w, b, scale, shift, mean, mean_lo, rstd, partials, offset, p.C, p.S, p.G, p.Cg, span,
                split, **blocks, **flags,
            )  # fmt: skip
            if needs_dx:
                _gn_bwd_split_dx_kernel[(count, split)](
                    x, dy, dx, w, b, scale, shift, mean, mean_lo, rstd, partials, offset, p.C, p.S, p.G, p.Cg,
                    span, split, BLOCK_SPLIT=_merge_step(split), **blocks, **flags,
                )  # fmt: skip
    block_c = min(triton.next_power_of_2(p.C), 128)
    if needs_dw or needs_db:
        _gn_bwd_dparams_kernel[(triton.cdiv(p.C, block_c),)](
            partials, mean_lo, rstd, scale, dw, db, p.N, p.C, p.G, p.Cg, split,
            BLOCK_N=min(triton.next_power_of_2(p.N), 16), BLOCK_C=block_c, HAS_SCALE=p.has_scale,
            NEEDS_DW=needs_dw, NEEDS_DB=needs_db, ACC=flags["ACC"],
        )  # fmt: skip
    if needs_dscale or needs_dshift:
        _gn_bwd_dscale_shift_kernel[(p.N, triton.cdiv(p.C, block_c))](
            partials, w, b, mean_lo, rstd, dscale, dshift, p.C, p.G, p.Cg, split, BLOCK_C=block_c,
            HAS_WEIGHT=p.has_weight, HAS_BIAS=p.has_bias, NEEDS_DSCALE=needs_dscale, NEEDS_DSHIFT=needs_dshift,
            ACC=flags["ACC"],
        )  # fmt: skip
