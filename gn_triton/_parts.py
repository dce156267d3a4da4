"""GroupNorm in parts, for statistics that combine several tensors (gn_triton.stats, gn_triton.distributed):
the launches of each part (gn_triton._launches.plan_part_launches) and the small float64 merges between
them; `torch_*` are the same parts in torch ops, for tensors the kernels do not take
(gn_triton.backend_for gives "torch").

A piece's statistics per (n, g) are (count, mean, mean_lo, m2): count elements, mean + mean_lo their
mean to about twice the statistics dtype's precision, m2 the sum of squared deviations from it. Merges
run in float64 on the (N, G)-sized values, in a fixed order (the same torch ops on the same values give
the same bits on every process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _tuning
from ._activations import ACTIVATIONS
from ._launch import _dense, _dense_params, _run, empty_grads, stats_dtype
from ._launches import plan_part_launches
from ._plan import Affine, Plan, Problem, memory_format


def merge(count: torch.Tensor, base: torch.Tensor, offset: torch.Tensor, m2: torch.Tensor, dim: int):
    """Merge parts along `dim` with Chan's update, in float64: part k holds count[k] elements whose mean
    is base[k] + offset[k] and whose squared deviations from it sum to m2[k]. Returns (count, ref, delta,
    m2) with the merged mean ref + delta, ref the base of the largest part (so `delta` is small and the
    differences to it exact for data with a large common offset)."""
    count, base, offset, m2 = (t.to(torch.float64) for t in (count, base, offset, m2))
    ref = base.gather(dim, count.argmax(dim, keepdim=True))
    present = count > 0
    part_delta = torch.where(present, (base - ref) + offset, 0.0)  # a part's mean relative to ref
    total = count.sum(dim, keepdim=True)
    delta = (count * part_delta).sum(dim, keepdim=True) / total.clamp(min=1.0)
    dev = torch.where(present, part_delta - delta, 0.0)
    m2 = (torch.where(present, m2, 0.0) + count * dev * dev).sum(dim, keepdim=True)
    return total.squeeze(dim), ref.squeeze(dim), delta.squeeze(dim), m2.squeeze(dim)


def as_pair(ref: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in `dtype` with hi the value ref + delta rounded and hi + lo = ref + delta (float64 in)."""
    hi = (ref + delta).to(dtype)
    lo = delta - (hi.to(torch.float64) - ref)  # exact: hi - ref is, when ref is a value of `dtype`
    return hi, lo.to(dtype)


def rstd_of(count: torch.Tensor, m2: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """1/sqrt(var + eps) of merged statistics (biased variance; NaN for an empty group, like torch)."""
    var = m2.to(torch.float64) / count.to(torch.float64)
    return (1.0 / torch.sqrt(var + eps)).to(dtype)


def _plan(direction: str, p: Problem, x: torch.Tensor) -> Plan:
    return _tuning.untimed_plan(direction, p, x.device)


def group_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    """(count, mean, mean_lo, m2) of each (n, g) of x: the partial-statistics kernel over the plan's
    pieces (each relative to its own reference value), merged here."""
    N = x.shape[0]
    dtype = stats_dtype(x)
    count = torch.full((N, num_groups), (x.shape[1] // num_groups) * math.prod(x.shape[2:]), device=x.device)
    if x.numel() == 0:
        zeros = torch.zeros((N, num_groups), dtype=dtype, device=x.device)
        return count, zeros, zeros.clone(), zeros.clone()
    x = _dense(x, memory_format(x))
    p = Problem.of(x, num_groups, Affine(None, None))
    plan = _plan("fwd", p, x)
    span, spans = plan.span(p.S)
    chunk_c, chunks = plan.chunk(p)
    # One partial per group and (chunk, span) piece: count, mean and M2 of x - reference, the reference.
    partials = torch.empty((p.rows, chunks * spans, 4), dtype=dtype, device=x.device)
    sizes = (p.C, p.S, p.G, p.Cg)
    _run(
        plan_part_launches("stats", p, plan),
        {"_gn_fwd_partial_stats_kernel": lambda offset: (x, partials, offset, *sizes, span, chunks * spans)},
    )
    # The exact count of each piece (the workspace's is in the accumulator dtype).
    lengths = torch.clamp(p.S - span * torch.arange(spans, device=x.device), max=span)
    widths = torch.clamp(p.Cg - chunk_c * torch.arange(chunks, device=x.device), max=chunk_c)
    piece_count = (widths[:, None] * lengths[None, :]).reshape(-1).to(torch.float64).expand(p.rows, -1)
    _, ref, delta, m2 = merge(piece_count, partials[..., 3], partials[..., 1], partials[..., 2], 1)
    mean, mean_lo = as_pair(ref, delta, dtype)
    return count, mean.reshape(N, num_groups), mean_lo.reshape(N, num_groups), m2.to(dtype).reshape(N, num_groups)


def normalize(x, num_groups: int, affine: Affine, mean, mean_lo, rstd, out_dtype: torch.dtype) -> torch.Tensor:
    """y = act((x_hat*w + b)*(1 + scale) + shift) with the given (N, G) statistics, in out_dtype and x's
    memory format."""
    y = torch.empty_like(x, dtype=out_dtype, memory_format=memory_format(x))
    if x.numel() == 0:
        return y
    x = _dense(x, memory_format(x))
    affine = _dense_params(affine)
    p = Problem.of(x, num_groups, affine, out_dtype)
    plan = _plan("fwd", p, x)
    span = plan.span(p.S)[0]
    w, b, scale, shift = affine.pointers(x)
    mean, mean_lo, rstd = (t.contiguous() for t in (mean, mean_lo, rstd))
    _run(plan_part_launches("normalize", p, plan), {
        "_gn_normalize_kernel": lambda offset: (
            x, y, w, b, scale, shift, mean, mean_lo, rstd, offset, p.C, p.S, p.G, p.Cg, span)})  # fmt: skip
    return y


def grad_sums(dy, x, num_groups: int, affine: Affine, mean, mean_lo, rstd, needs: Sequence[bool]):
    """The backward's first part: per-(n, c) sums of dz and dz*(x - mean) over x's positions, float64
    (N, C, 2), and the gradients of weight, bias, scale and shift from this x alone (those `needs` asks
    for, else empty tensors): (sums, dweight, dbias, dscale, dshift)."""
    N, C = x.shape[:2]
    grads = empty_grads(x, affine, [False, *needs])[1:]
    if x.numel() == 0:  # no positions: sums and gradients are zero
        return (torch.zeros((N, C, 2), dtype=torch.float64, device=x.device), *(g.zero_() for g in grads))
    fmt = memory_format(x)
    x, dy = _dense(x, fmt), _dense(dy, fmt)
    affine = _dense_params(affine)
    p = Problem.of(x, num_groups, affine, dy.dtype)
    plan = _plan("bwd", p, x)
    span, spans = plan.span(p.S)
    w, b, scale, shift = affine.pointers(x)
    mean, mean_lo, rstd = (t.contiguous() for t in (mean, mean_lo, rstd))
    partials = torch.empty((N, C, spans, 2), dtype=mean.dtype, device=x.device)
    dw, db, dscale, dshift = (g if g.numel() else x for g in grads)  # placeholders where not needed
    _run(plan_part_launches("grad_sums", p, plan, [g.numel() > 0 for g in grads]), {
        "_gn_bwd_partial_sums_kernel": lambda offset: (
            x, dy, w, b, scale, shift, mean, mean_lo, rstd, partials, offset, p.C, p.S, p.G, p.Cg, span, spans),
        "_gn_bwd_dparams_kernel": lambda _: (partials, mean_lo, rstd, scale, dw, db, p.N, p.C, p.G, p.Cg, spans),
        "_gn_bwd_dscale_shift_kernel": lambda _: (
            partials, w, b, mean_lo, rstd, dscale, dshift, p.C, p.G, p.Cg, spans),
    })  # fmt: skip
    return (partials.to(torch.float64).sum(2), *grads)


def dx_coefficients(sums, count, affine: Affine, num_groups: int, mean_lo, rstd):
    """The group coefficients of dx = a*dz + coef_x*(x - mean_hi) + coef_1 (kernels/_tile.py,
    dx_coefficients) from the per-(n, c) sums of the whole group (float64 (N, C, 2)) and its element
    count (N, G): (coef_x, coef_1) in the statistics' dtype."""
    N, C = sums.shape[:2]
    w = torch.ones((N, C), dtype=torch.float64, device=sums.device)
    if affine.weight is not None:
        w = w * affine.weight.to(torch.float64)
    if affine.scale is not None:
        w = w * (1 + affine.scale.to(torch.float64))
    weighted = (sums * w[..., None]).reshape(N, num_groups, -1, 2).sum(2)
    dzw_sum, dzw_xc_sum = weighted[..., 0], weighted[..., 1]
    r, lo, m = rstd.to(torch.float64), mean_lo.to(torch.float64), count.to(torch.float64)
    coef_x = -r * r * (r * (dzw_xc_sum - lo * dzw_sum) / m)
    coef_1 = -r * (dzw_sum / m) - coef_x * lo
    return coef_x.to(rstd.dtype), coef_1.to(rstd.dtype)


def dx(dy, x, num_groups: int, affine: Affine, mean, mean_lo, rstd, coef_x, coef_1) -> torch.Tensor:
    """dx with the given group coefficients (dx_coefficients), in x's dtype and memory format."""
    fmt = memory_format(x)
    out = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return out
    x, dy = _dense(x, fmt), _dense(dy, fmt)
    affine = _dense_params(affine)
    p = Problem.of(x, num_groups, affine, dy.dtype)
    plan = _plan("bwd", p, x)
    span = plan.span(p.S)[0]
    w, b, scale, shift = affine.pointers(x)
    stats = tuple(t.contiguous() for t in (mean, mean_lo, rstd, coef_x, coef_1))
    _run(
        plan_part_launches("dx", p, plan),
        {"_gn_dx_kernel": lambda offset: (x, dy, out, w, b, scale, shift, *stats, offset, p.C, p.S, p.G, p.Cg, span)},
    )
    return out


# --- the same parts in torch ops: CPU tensors without the interpreter, dtypes the kernels do not take ---


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) values broadcast over x's positions."""
    return t.reshape(*t.shape, *[1] * (x.dim() - 2))


def _torch_affine(x, num_groups: int, affine: Affine, mean, mean_lo, rstd):
    """Per-(n, c) mean_hi, a and b of z = (x - mean_hi)*a + b (kernels/_tile.py, channel_affine), in the
    statistics' dtype, and the effective weight's gain before the scale (a0, b0: the affine alone)."""
    Cg = x.shape[1] // num_groups
    hi, lo, a = (t.repeat_interleave(Cg, 1) for t in (mean, mean_lo, rstd))
    acc = rstd.dtype
    if affine.weight is not None:
        a = a * affine.weight.to(acc)
    b = -lo * a
    if affine.bias is not None:
        b = b + affine.bias.to(acc)
    a0, b0 = a, b
    if affine.scale is not None:
        a, b = a * (1 + affine.scale.to(acc)), b * (1 + affine.scale.to(acc))
    if affine.shift is not None:
        b = b + affine.shift.to(acc)
    return hi, a, b, a0, b0


def torch_group_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    N = x.shape[0]
    rows = x.to(torch.float64).reshape(N, num_groups, -1)
    count = torch.full((N, num_groups), rows.shape[-1], dtype=torch.int64, device=x.device)
    if rows.shape[-1] == 0:
        zeros = torch.zeros((N, num_groups), dtype=stats_dtype(x), device=x.device)
        return count, zeros, zeros.clone(), zeros.clone()
    mean = rows.mean(-1)
    m2 = ((rows - mean[..., None]) ** 2).sum(-1)
    hi, lo = as_pair(mean, torch.zeros_like(mean), stats_dtype(x))
    return count, hi, lo, m2.to(stats_dtype(x))


def _torch_z(x, num_groups, affine, mean, mean_lo, rstd):
    hi, a, b, a0, b0 = _torch_affine(x, num_groups, affine, mean, mean_lo, rstd)
    xc = x.to(rstd.dtype) - _per_channel(hi, x)
    return xc, xc * _per_channel(a, x) + _per_channel(b, x), a, a0, b0


def torch_normalize(x, num_groups: int, affine: Affine, mean, mean_lo, rstd, out_dtype) -> torch.Tensor:
    z = _torch_z(x, num_groups, affine, mean, mean_lo, rstd)[1]
    y = z if affine.activation is None else ACTIVATIONS[affine.activation].torch(z)
    return y.to(out_dtype).contiguous(memory_format=memory_format(x))


def torch_grad_sums(dy, x, num_groups: int, affine: Affine, mean, mean_lo, rstd, needs: Sequence[bool]):
    xc, z, _, a0, b0 = _torch_z(x, num_groups, affine, mean, mean_lo, rstd)
    dz = dy.to(rstd.dtype)
    if affine.activation is not None:
        dz = ACTIVATIONS[affine.activation].tangent(dz, z)
    positions = tuple(range(2, x.dim()))
    dz_sum, dz_xc_sum = (t.to(torch.float64).sum(positions) for t in (dz, dz * xc))
    gain = 1.0 if affine.scale is None else 1 + affine.scale.to(torch.float64)
    Cg = x.shape[1] // num_groups
    r, lo = (t.to(torch.float64).repeat_interleave(Cg, 1) for t in (rstd, mean_lo))
    grads = (
        lambda: (gain * r * (dz_xc_sum - lo * dz_sum)).sum(0),  # dweight
        lambda: (gain * dz_sum).sum(0),  # dbias
        lambda: a0.to(torch.float64) * dz_xc_sum + b0.to(torch.float64) * dz_sum,  # dscale
        lambda: dz_sum,  # dshift
    )
    tensors = (affine.weight, affine.bias, affine.scale, affine.shift)
    return (torch.stack((dz_sum, dz_xc_sum), -1), *(
        grad().to(t.dtype) if need and t is not None else x.new_empty(0)
        for need, grad, t in zip(needs, grads, tensors)))  # fmt: skip


def torch_dx(dy, x, num_groups: int, affine: Affine, mean, mean_lo, rstd, coef_x, coef_1) -> torch.Tensor:
    xc, z, a, _, _ = _torch_z(x, num_groups, affine, mean, mean_lo, rstd)
    dz = dy.to(rstd.dtype)
    if affine.activation is not None:
        dz = ACTIVATIONS[affine.activation].tangent(dz, z)
    Cg = x.shape[1] // num_groups
    kx, k1 = (_per_channel(t.repeat_interleave(Cg, 1), x) for t in (coef_x, coef_1))
    out = _per_channel(a, x) * dz + kx * xc + k1
    return out.to(x.dtype).contiguous(memory_format=memory_format(x))
