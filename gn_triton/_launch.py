"""Host side of the kernels: argument checks, layout, allocation, plan choice and launches.

`gn_fwd` and `gn_bwd` are the only entry points the ops layer uses. A `Plan` says how a problem is
cut into programs; `gn_triton._tuning` chooses it (heuristic or autotuned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from . import _tuning
from ._tuning import INTERPRET, Plan, Problem
from .kernels import (
    _gn_bwd_dparams_kernel,
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


def _problem(x: torch.Tensor, num_groups: int, has_weight: bool, has_bias: bool, activation: int) -> Problem:
    return Problem(
        N=x.shape[0],
        C=x.shape[1],
        S=math.prod(x.shape[2:]),
        G=num_groups,
        dtype=x.dtype,
        channels_last=memory_format(x) != torch.contiguous_format,
        has_weight=has_weight,
        has_bias=has_bias,
        activation=activation,
    )


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`t` laid out densely in `fmt` (no copy when it already is; stride-0 gradients get one)."""
    return t.contiguous(memory_format=fmt)


def _kernel_flags(x: torch.Tensor, problem: Problem) -> dict:
    """The constexpr flags every normalising kernel takes."""
    return dict(
        HAS_WEIGHT=problem.has_weight,
        HAS_BIAS=problem.has_bias,
        ACTIVATION=problem.activation,
        CHANNELS_LAST=problem.channels_last,
        INDEX_64=x.numel() > _INT32_MAX,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )


def _base_flags(flags: dict) -> dict:
    """The flags of the kernels that only read x (partial statistics): layout, indexing, accumulator."""
    return {k: flags[k] for k in ("CHANNELS_LAST", "INDEX_64", "ACC")}


def gn_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm forward, optionally followed by a fused activation. Returns (y, mean, mean_lo, rstd);
    the stats are (N, G) in fp32 (fp64 for fp64 input), mean is the group mean rounded to that dtype
    and mean_lo the rounding residual."""
    fmt = memory_format(x)
    y = torch.empty_like(x, memory_format=fmt)
    N, C = x.shape[:2]
    mean, mean_lo, rstd = (torch.empty((N, num_groups), dtype=stats_dtype(x), device=x.device) for _ in range(3))
    problem = _problem(x, num_groups, weight is not None, bias is not None, check_activation(activation))
    if y.numel() == 0:
        # Like torch: an empty group has NaN statistics.
        for t in (mean, mean_lo, rstd):
            t.fill_(float("nan"))
        return y, mean, mean_lo, rstd
    x = _dense(x, fmt)

    def launch(plan: Plan) -> None:
        _launch_fwd(x, y, weight, bias, mean, mean_lo, rstd, eps, problem, plan)

    launch(_tuning.choose_plan("fwd", problem, x.device, launch))
    return y, mean, mean_lo, rstd


def _launch_fwd(x, y, weight, bias, mean, mean_lo, rstd, eps, p: Problem, plan: Plan) -> None:
    flags = _kernel_flags(x, p)
    w = weight if weight is not None else x  # placeholder pointer, never read
    b = bias if bias is not None else x
    blocks = dict(R=plan.groups_per_program, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    if plan.split == 1:
        _gn_fwd_fused_kernel[(plan.blocks(p),)](
            x, y, w, b, mean, mean_lo, rstd, p.C, p.S, p.G, p.Cg, eps, **blocks, **flags
        )
        return
    span, split = plan.span(p.S)
    partials = torch.empty((p.rows, split, 3), dtype=mean.dtype, device=x.device)
    for offset, count in plan.waves(p):
        _gn_fwd_partial_stats_kernel[(count, split)](
            x, partials, offset, p.C, p.S, p.G, p.Cg, span, split, **blocks, **_base_flags(flags)
        )
        _gn_fwd_split_apply_kernel[(count, split)](
            x, y, w, b, partials, mean, mean_lo, rstd, offset, p.C, p.S, p.G, p.Cg, span, split, eps,
            BLOCK_SPLIT=triton.next_power_of_2(split), **blocks, **flags,
        )  # fmt: skip


def gn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    mean_lo: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    output_mask: Sequence[bool],
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (+ fused activation) backward: (dx, dweight, dbias). A gradient not asked for in
    `output_mask`, or of a parameter that is None, comes back as an empty tensor and costs nothing."""
    needs_dx, needs_dw, needs_db = output_mask
    needs_dw = needs_dw and weight is not None
    needs_db = needs_db and bias is not None
    fmt = memory_format(x)
    dx = torch.empty_like(x, memory_format=fmt) if needs_dx else x.new_empty(0)
    dw = torch.empty_like(weight) if needs_dw else x.new_empty(0)
    db = torch.empty_like(bias) if needs_db else x.new_empty(0)
    if not (needs_dx or needs_dw or needs_db):
        return dx, dw, db
    if x.numel() == 0:
        dw.zero_()
        db.zero_()
        return dx, dw, db
    x = _dense(x, fmt)
    grad_out = _dense(grad_out, fmt)
    problem = _problem(x, num_groups, weight is not None, bias is not None, check_activation(activation))

    def launch(plan: Plan) -> None:
        _launch_bwd(grad_out, x, weight, bias, mean, mean_lo, rstd, dx, dw, db, needs_dx, problem, plan)

    launch(_tuning.choose_plan("bwd", problem, x.device, launch, needs=(needs_dx, needs_dw, needs_db)))
    return dx, dw, db


def _launch_bwd(dy, x, weight, bias, mean, mean_lo, rstd, dx, dw, db, needs_dx, p: Problem, plan: Plan) -> None:
    flags = _kernel_flags(x, p)
    w = weight if weight is not None else x  # placeholder pointers, never read
    b = bias if bias is not None else x
    blocks = dict(R=plan.groups_per_program, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    needs_params = dw.numel() > 0 or db.numel() > 0
    if plan.split == 1:
        split = 1
        partials = torch.empty((p.N, p.C, 1, 2), dtype=mean.dtype, device=x.device) if needs_params else x
        _gn_bwd_fused_kernel[(plan.blocks(p),)](
            x, dy, dx, w, b, mean, mean_lo, rstd, partials, p.C, p.S, p.G, p.Cg,
            NEEDS_DX=needs_dx, NEEDS_PARTIALS=needs_params, **blocks, **flags,
        )  # fmt: skip
    else:
        span, split = plan.span(p.S)
        partials = torch.empty((p.N, p.C, split, 2), dtype=mean.dtype, device=x.device)
        for offset, count in plan.waves(p):
            _gn_bwd_partial_sums_kernel[(count, split)](
                x, dy, w, b, mean, mean_lo, rstd, partials, offset, p.C, p.S, p.G, p.Cg, span, split,
                **blocks, **flags,
            )  # fmt: skip
            if needs_dx:
                _gn_bwd_split_dx_kernel[(count, split)](
                    x, dy, dx, w, b, mean, mean_lo, rstd, partials, offset, p.C, p.S, p.G, p.Cg, span,
                    split, BLOCK_SPLIT=triton.next_power_of_2(split), **blocks, **flags,
                )  # fmt: skip
    if needs_params:
        block_c = min(triton.next_power_of_2(p.C), 128)
        _gn_bwd_dparams_kernel[(triton.cdiv(p.C, block_c),)](
            partials, mean_lo, rstd, dw if dw.numel() else x, db if db.numel() else x,
            p.N, p.C, p.G, p.Cg, split, BLOCK_N=min(triton.next_power_of_2(p.N), 16), BLOCK_C=block_c,
            NEEDS_DW=dw.numel() > 0, NEEDS_DB=db.numel() > 0, ACC=flags["ACC"],
        )  # fmt: skip
