"""GroupNorm backward kernels (deterministic: no atomics anywhere).

With x_hat = rstd*(x - mean), g the gradient at the affine's output (dy, or dy*act'(z) with a fused
activation, z recomputed from x) and gw = g*w[c], the gradients are
    dx      = rstd*(gw - <gw> - x_hat*<gw*x_hat>)    (<.>: mean over the group)
    dweight = sum over n, positions of g*x_hat
    dbias   = sum over n, positions of g
Every path first forms per-(n, c) sums of g and of g*(x - mean_hi) in a small ACC workspace
Partials (N, C, SPLIT, 2); dx needs only their per-group weighted totals, and dweight/dbias are a
fixed-order reduction of the workspace over n and spans (`_gn_bwd_dparams_kernel`); the gradients
of a per-sample scale and shift are per-(n, c) totals of the same sums (`_gn_bwd_dscale_shift_kernel`).
Programs own blocks of R groups of one sample, as in the forward.
  fused: a program takes its groups' sums over all positions, then writes dx (the second read of
         x, dy hits L1/L2).
  split: `_gn_bwd_partial_sums_kernel` writes per-span sums, `_gn_bwd_split_dx_kernel` merges the
         block's spans in a fixed order and writes dx for its own span.
"""

import triton
import triton.language as tl

from ._tile import (
    channel_affine,
    channel_grad_sums,
    dx_coefficients,
    dx_span,
    effective_weight,
    group_block,
    group_membership,
    group_size,
    to_channels,
    to_groups,
)


@triton.jit
def _load_stats(Mean, MeanLo, Rstd, n, G, g, g_mask):
    stat = n * G + g
    mean_hi = tl.load(Mean + stat, mask=g_mask, other=0.0)
    mean_lo = tl.load(MeanLo + stat, mask=g_mask, other=0.0)
    rstd = tl.load(Rstd + stat, mask=g_mask, other=0.0)
    return mean_hi, mean_lo, rstd


@triton.jit
def _gn_bwd_fused_kernel(
    X,  # (N, C, S) input of the forward
    DY,  # (N, C, S) output gradient, X's layout
    DX,  # (N, C, S) input gradient, X's dtype and layout; unused unless NEEDS_DX
    W,  # (C,) weight; unused unless HAS_WEIGHT
    B,  # (C,) bias; read only with a fused activation and HAS_BIAS
    Scale,  # (N, C) per-sample scale; unused unless HAS_SCALE
    Shift,  # (N, C) per-sample shift; read only with a fused activation and HAS_SHIFT
    Mean,  # (N, G) ACC
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    Partials,  # (N, C, 1, 2) ACC: per-(n, c) sum(g), sum(g*(x - mean_hi)); unused unless NEEDS_PARTIALS
    C, S, G, Cg,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NEEDS_DX: tl.constexpr, NEEDS_PARTIALS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, g, g_mask = group_block(tl.program_id(0), G, Cg, C, R)
    x_sample = X + n.to(tl.int64) * C * S
    dy_sample = DY + n.to(tl.int64) * C * S
    scale_n = Scale + n * C
    shift_n = Shift + n * C
    mean_hi, mean_lo, rstd = _load_stats(Mean, MeanLo, Rstd, n, G, g, g_mask)

    sum_g_dy = tl.zeros([R], ACC)
    sum_g_dy_xc = tl.zeros([R], ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        a, b = channel_affine(
            member, c, c < c_end, W, B, scale_n, shift_n, mean_lo, rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE,
            HAS_SHIFT, ACC,
        )  # fmt: skip
        sum_dy, sum_dy_xc = channel_grad_sums(
            x_sample, dy_sample, to_channels(member, mean_hi), a, b, c, c_end, 0, S, C, S,
            BLOCK_C, BLOCK_S, ACTIVATION, CHANNELS_LAST, INDEX_64, ACC,
        )  # fmt: skip
        if NEEDS_PARTIALS:
            part = Partials + (n.to(tl.int64) * C + c) * 2
            tl.store(part, sum_dy, mask=c < c_end)
            tl.store(part + 1, sum_dy_xc, mask=c < c_end)
        if HAS_WEIGHT or HAS_SCALE:
            w = effective_weight(c, c < c_end, W, scale_n, HAS_WEIGHT, HAS_SCALE, ACC)
            sum_dy *= w
            sum_dy_xc *= w
        sum_g_dy += to_groups(member, sum_dy)
        sum_g_dy_xc += to_groups(member, sum_dy_xc)

    if NEEDS_DX:
        coef_x, coef_1 = dx_coefficients(sum_g_dy, sum_g_dy_xc, mean_lo, rstd, group_size(Cg, S, ACC))
        dx_span(
            x_sample, dy_sample, DX + n.to(tl.int64) * C * S, W, B, scale_n, shift_n, mean_hi, mean_lo, rstd,
            coef_x, coef_1, c_begin, c_end, 0, S, C, S, Cg, R, BLOCK_C, BLOCK_S, HAS_WEIGHT, HAS_BIAS, HAS_SCALE,
            HAS_SHIFT, ACTIVATION, CHANNELS_LAST, INDEX_64, ACC,
        )  # fmt: skip


@triton.jit
def _gn_bwd_partial_sums_kernel(
    X,  # (N, C, S) input of the forward
    DY,  # (N, C, S) output gradient, X's layout
    W,  # (C,) weight; read only with a fused activation and HAS_WEIGHT
    B,  # (C,) bias; read only with a fused activation and HAS_BIAS
    Scale,  # (N, C) per-sample scale; read only with a fused activation and HAS_SCALE
    Shift,  # (N, C) per-sample shift; read only with a fused activation and HAS_SHIFT
    Mean,  # (N, G) ACC
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    Partials,  # (N, C, SPLIT, 2) ACC: per-(n, c, span) sum(g), sum(g*(x - mean_hi))
    block_offset, C, S, G, Cg, span, SPLIT,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, g, g_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R)
    j = tl.program_id(1)
    s_begin = j * span
    s_end = s_begin + tl.minimum(span, S - s_begin)  # s_begin + span may pass 2^31
    x_sample = X + n.to(tl.int64) * C * S
    dy_sample = DY + n.to(tl.int64) * C * S
    mean_hi, mean_lo, rstd = _load_stats(Mean, MeanLo, Rstd, n, G, g, g_mask)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        a, b = channel_affine(
            member, c, c < c_end, W, B, Scale + n * C, Shift + n * C, mean_lo, rstd, HAS_WEIGHT, HAS_BIAS,
            HAS_SCALE, HAS_SHIFT, ACC,
        )  # fmt: skip
        sum_dy, sum_dy_xc = channel_grad_sums(
            x_sample, dy_sample, to_channels(member, mean_hi), a, b, c, c_end, s_begin, s_end, C, S,
            BLOCK_C, BLOCK_S, ACTIVATION, CHANNELS_LAST, INDEX_64, ACC,
        )  # fmt: skip
        part = Partials + ((n.to(tl.int64) * C + c) * SPLIT + j) * 2
        tl.store(part, sum_dy, mask=c < c_end)
        tl.store(part + 1, sum_dy_xc, mask=c < c_end)


@triton.jit
def _gn_bwd_split_dx_kernel(
    X,  # (N, C, S) input of the forward
    DY,  # (N, C, S) output gradient, X's layout
    DX,  # (N, C, S) input gradient, X's dtype and layout
    W,  # (C,) weight; unused unless HAS_WEIGHT
    B,  # (C,) bias; read only with a fused activation and HAS_BIAS
    Scale,  # (N, C) per-sample scale; unused unless HAS_SCALE
    Shift,  # (N, C) per-sample shift; read only with a fused activation and HAS_SHIFT
    Mean,  # (N, G) ACC
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    Partials,  # (N, C, SPLIT, 2) ACC, from _gn_bwd_partial_sums_kernel
    block_offset, C, S, G, Cg, span, SPLIT,
    BLOCK_SPLIT: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, g, g_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R)
    j = tl.program_id(1)
    mean_hi, mean_lo, rstd = _load_stats(Mean, MeanLo, Rstd, n, G, g, g_mask)

    # Merge the spans' per-channel sums (fixed order), weight them, and total them per group.
    sum_g_dy = tl.zeros([R], ACC)
    sum_g_dy_xc = tl.zeros([R], ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_end
        part = Partials + (n.to(tl.int64) * C + c)[:, None] * SPLIT * 2
        sum_dy = tl.zeros([BLOCK_C], ACC)
        sum_dy_xc = tl.zeros([BLOCK_C], ACC)
        for k0 in range(0, SPLIT, BLOCK_SPLIT):  # BLOCK_SPLIT spans per step, in a fixed order
            k = k0 + tl.arange(0, BLOCK_SPLIT)[None, :]
            mask = c_mask[:, None] & (k < SPLIT)
            sum_dy += tl.sum(tl.load(part + k * 2, mask=mask, other=0.0), axis=1)
            sum_dy_xc += tl.sum(tl.load(part + k * 2 + 1, mask=mask, other=0.0), axis=1)
        if HAS_WEIGHT or HAS_SCALE:
            w = effective_weight(c, c_mask, W, Scale + n * C, HAS_WEIGHT, HAS_SCALE, ACC)
            sum_dy *= w
            sum_dy_xc *= w
        member = group_membership(c, c_begin, c_end, Cg, R)
        sum_g_dy += to_groups(member, sum_dy)
        sum_g_dy_xc += to_groups(member, sum_dy_xc)

    coef_x, coef_1 = dx_coefficients(sum_g_dy, sum_g_dy_xc, mean_lo, rstd, group_size(Cg, S, ACC))
    s_begin = j * span
    s_end = s_begin + tl.minimum(span, S - s_begin)  # s_begin + span may pass 2^31
    dx_span(
        X + n.to(tl.int64) * C * S, DY + n.to(tl.int64) * C * S, DX + n.to(tl.int64) * C * S, W, B,
        Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, coef_x, coef_1, c_begin, c_end, s_begin, s_end,
        C, S, Cg, R, BLOCK_C, BLOCK_S, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, CHANNELS_LAST,
        INDEX_64, ACC,
    )  # fmt: skip


@triton.jit
def _gn_bwd_dparams_kernel(
    Partials,  # (N, C, SPLIT, 2) ACC: per-(n, c, span) sum(g), sum(g*(x - mean_hi))
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    Scale,  # (N, C) per-sample scale; unused unless HAS_SCALE
    DW,  # (C,) weight gradient, weight's dtype; unused unless NEEDS_DW
    DB,  # (C,) bias gradient, bias's dtype; unused unless NEEDS_DB
    N, C, G, Cg, SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEEDS_DW: tl.constexpr, NEEDS_DB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dweight[c] = sum_n (1 + scale)*rstd*(sum(g*(x - mean_hi)) - mean_lo*sum(g)),
    dbias[c] = sum_n (1 + scale)*sum(g), in a fixed order (n blocks, then spans): bitwise repeatable."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dw = tl.zeros([BLOCK_C], ACC)
    db = tl.zeros([BLOCK_C], ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        sum_dy = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        sum_dy_xc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        part = Partials + (n.to(tl.int64)[:, None] * C + c[None, :]) * SPLIT * 2
        for j in range(0, SPLIT):
            sum_dy += tl.load(part + j * 2, mask=mask, other=0.0)
            sum_dy_xc += tl.load(part + j * 2 + 1, mask=mask, other=0.0)
        if HAS_SCALE:  # the gradient reaching the affine is g*(1 + scale[n, c])
            gain = 1.0 + tl.load(Scale + n[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
            sum_dy *= gain
            sum_dy_xc *= gain
        db += tl.sum(sum_dy, axis=0)
        if NEEDS_DW:
            stat = n[:, None] * G + (c // Cg)[None, :]
            rstd = tl.load(Rstd + stat, mask=mask, other=0.0)
            mean_lo = tl.load(MeanLo + stat, mask=mask, other=0.0)
            dw += tl.sum(rstd * (sum_dy_xc - mean_lo * sum_dy), axis=0)
    if NEEDS_DW:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=c_mask)
    if NEEDS_DB:
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=c_mask)


@triton.jit
def _gn_bwd_dscale_shift_kernel(
    Partials,  # (N, C, SPLIT, 2) ACC: per-(n, c, span) sum(g), sum(g*(x - mean_hi))
    W,  # (C,) weight; unused unless HAS_WEIGHT
    B,  # (C,) bias; unused unless HAS_BIAS
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    DScale,  # (N, C) scale gradient, scale's dtype; unused unless NEEDS_DSCALE
    DShift,  # (N, C) shift gradient, shift's dtype; unused unless NEEDS_DSHIFT
    C, G, Cg, SPLIT,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEEDS_DSCALE: tl.constexpr, NEEDS_DSHIFT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dshift[n, c] = sum(g); dscale[n, c] = sum(g*u) with u = x_hat*w + bias the affine output before
    the scale, so sum(g*u) = a*sum(g*(x - mean_hi)) + b*sum(g) with a = rstd*w, b = bias - mean_lo*a."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_g_xc = tl.zeros([BLOCK_C], ACC)
    part = Partials + (n.to(tl.int64) * C + c) * SPLIT * 2
    for j in range(0, SPLIT):
        sum_g += tl.load(part + j * 2, mask=c_mask, other=0.0)
        sum_g_xc += tl.load(part + j * 2 + 1, mask=c_mask, other=0.0)
    if NEEDS_DSHIFT:
        tl.store(DShift + n * C + c, sum_g.to(DShift.dtype.element_ty), mask=c_mask)
    if NEEDS_DSCALE:
        stat = n * G + c // Cg
        a = tl.load(Rstd + stat, mask=c_mask, other=0.0)
        if HAS_WEIGHT:
            a *= tl.load(W + c, mask=c_mask, other=0.0).to(ACC)
        b = -tl.load(MeanLo + stat, mask=c_mask, other=0.0) * a
        if HAS_BIAS:
            b += tl.load(B + c, mask=c_mask, other=0.0).to(ACC)
        tl.store(DScale + n * C + c, (a * sum_g_xc + b * sum_g).to(DScale.dtype.element_ty), mask=c_mask)
