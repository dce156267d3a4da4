"""Allocation and launches: `gn_fwd` and `gn_bwd` are the only entry points the ops layer uses.

A call is a Problem and an Affine, cut into programs by a Plan (gn_triton._plan) that
gn_triton._tuning chooses (the cost model's, or autotuned); this module allocates the outputs and
workspaces and launches the kernels of that plan, as the launch table (gn_triton._launches) lists
them: this module only says which tensors and sizes each kernel takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _tuning, kernels
from ._launches import Launch, plan_launches
from ._plan import Affine, Plan, Problem, memory_format

# The kernels by name, as the launch table names them.
KERNELS = {name: getattr(kernels, name) for name in kernels.__all__ if name.endswith("_kernel")}


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`t` laid out densely in `fmt` (no copy when it already is; stride-0 gradients get one)."""
    return t.contiguous(memory_format=fmt)


def _eps_pair(eps: float) -> tuple[float, float]:
    """eps as two fp32 values whose sum is eps to ~2^-48 relative: Triton passes Python floats as
    fp32, and fp64 kernels add the pair in fp64 (fp32 kernels see eps_hi alone, to the last bit)."""
    hi = torch.tensor(eps, dtype=torch.float32).item()
    return hi, eps - hi


def _tensors(affine: Affine) -> tuple[torch.Tensor | None, ...]:
    return affine.weight, affine.bias, affine.scale, affine.shift


def _dense_params(affine: Affine) -> Affine:
    """weight, bias (C,) and scale, shift (N, C) as dense rows, the kernels' `W + c` and `Scale + n*C + c`
    addressing (tiny: a copy only for a strided, transposed or expanded view)."""
    weight, bias, scale, shift = (None if t is None else t.contiguous() for t in _tensors(affine))
    return Affine(weight, bias, scale, shift, affine.activation)


def empty_outputs(x: torch.Tensor, num_groups: int, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The forward's outputs, unfilled: y (out_dtype, default x's, in x's memory format) and (N, G)
    mean, mean_lo and rstd in the statistics dtype. The one allocation of the real op and its fake
    implementation."""
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=memory_format(x))
    stats = (torch.empty((x.shape[0], num_groups), dtype=stats_dtype(x), device=x.device) for _ in range(3))
    return (y, *stats)


def empty_grads(x: torch.Tensor, affine: Affine, output_mask: Sequence[bool]) -> tuple[torch.Tensor, ...]:
    """The backward's outputs, unfilled: (dx, dweight, dbias, dscale, dshift) of their tensors' shapes
    and dtypes, dx in x's memory format and the others dense (the kernels write them as such, whatever
    the strides of a parameter's view); one not asked for in `output_mask`, or of a tensor that is
    None, is empty. The one allocation of the real op and its fake implementation."""
    fmt = memory_format(x)
    return tuple(
        (torch.empty_like(t, memory_format=fmt if t is x else torch.contiguous_format))
        if need and t is not None
        else x.new_empty(0)
        for need, t in zip(output_mask, (x, *_tensors(affine)))
    )


def gn_fwd(
    x: torch.Tensor, num_groups: int, eps: float, affine: Affine, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm forward with what follows it (`affine`). Returns (y, mean, mean_lo, rstd): y in
    out_dtype (default x's: the kernels read x and store y each in its own dtype); the stats are (N, G)
    in fp32 (fp64 for fp64 input), mean is the group mean rounded to that dtype and mean_lo the
    rounding residual."""
    y, mean, mean_lo, rstd = empty_outputs(x, num_groups, out_dtype)
    problem = Problem.of(x, num_groups, affine, y.dtype)
    if y.numel() == 0:
        # Like torch: an empty group has NaN statistics.
        for t in (mean, mean_lo, rstd):
            t.fill_(float("nan"))
        return y, mean, mean_lo, rstd
    x = _dense(x, memory_format(x))
    affine = _dense_params(affine)

    def launch(plan: Plan) -> None:
        _launch_fwd(x, y, affine, mean, mean_lo, rstd, eps, problem, plan)

    launch(_tuning.choose_plan("fwd", problem, x.device, launch))
    return y, mean, mean_lo, rstd


def _run(launches: list[Launch], arguments: dict) -> None:
    """Each launch of the table, with the positional arguments its kernel takes (arguments[kernel](offset))."""
    for launch in launches:
        KERNELS[launch.kernel][launch.grid](*arguments[launch.kernel](launch.offset), **launch.constexprs)


def _launch_fwd(x, y, affine: Affine, mean, mean_lo, rstd, eps, p: Problem, plan: Plan) -> None:
    w, b, scale, shift = affine.pointers(x)
    sizes, eps_pair = (p.C, p.S, p.G, p.Cg), _eps_pair(eps)
    span, spans = plan.span(p.S)  # one span (spans = 1) on the fused path
    pieces = spans * plan.chunk(p)[1]  # one partial per group and (chunk, span) piece
    partials = torch.empty((p.rows, pieces, 4), dtype=mean.dtype, device=x.device) if plan.split > 1 else None
    _run(plan_launches("fwd", p, plan), {
        "_gn_fwd_fused_kernel": lambda _: (x, y, w, b, scale, shift, mean, mean_lo, rstd, *sizes, *eps_pair),
        "_gn_fwd_partial_stats_kernel": lambda offset: (x, partials, offset, *sizes, span, pieces),
        "_gn_fwd_split_apply_kernel": lambda offset: (
            x, y, w, b, scale, shift, partials, mean, mean_lo, rstd, offset, *sizes, span, pieces, *eps_pair),
    })  # fmt: skip


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
    affine = _dense_params(affine)
    mean, mean_lo, rstd = (t.contiguous() for t in (mean, mean_lo, rstd))  # e.g. expanded by vmap (tiny)
    problem = Problem.of(x, num_groups, affine, grad_out.dtype)

    def launch(plan: Plan) -> None:
        _launch_bwd(grad_out, x, affine, mean, mean_lo, rstd, grads, problem, plan)

    launch(_tuning.choose_plan("bwd", problem, x.device, launch, needs=needs))
    return grads


def _launch_bwd(dy, x, affine: Affine, mean, mean_lo, rstd, grads, p: Problem, plan: Plan) -> None:
    dx, dw, db, dscale, dshift = (g if g.numel() else x for g in grads)  # placeholders where not needed
    needs = tuple(g.numel() > 0 for g in grads)
    w, b, scale, shift = affine.pointers(x)
    sizes, stats = (p.C, p.S, p.G, p.Cg), (mean, mean_lo, rstd)
    span, spans = plan.span(p.S)  # one span (spans = 1) on the fused path
    # Per-(n, c) sums of dz and dz*(x - mean) per span: the split dx's and the parameter gradients' input.
    needs_partials = plan.split > 1 or any(needs[1:])
    partials = torch.empty((p.N, p.C, spans, 2), dtype=mean.dtype, device=x.device) if needs_partials else x
    _run(plan_launches("bwd", p, plan, needs), {
        "_gn_bwd_fused_kernel": lambda _: (x, dy, dx, w, b, scale, shift, *stats, partials, *sizes),
        "_gn_bwd_partial_sums_kernel": lambda offset: (
            x, dy, w, b, scale, shift, *stats, partials, offset, *sizes, span, spans),
        "_gn_bwd_split_dx_kernel": lambda offset: (
            x, dy, dx, w, b, scale, shift, *stats, partials, offset, *sizes, span, spans),
        "_gn_bwd_dparams_kernel": lambda _: (partials, mean_lo, rstd, scale, dw, db, p.N, p.C, p.G, p.Cg, spans),
        "_gn_bwd_dscale_shift_kernel": lambda _: (partials, w, b, mean_lo, rstd, dscale, dshift, p.C, p.G, p.Cg, spans),
    })  # fmt: skip
