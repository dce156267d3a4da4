"""GroupNorm backward kernels (deterministic: no atomics anywhere).

The math, once. With x_hat = rstd*(x - mean) (mean carried as mean_hi + mean_lo), the affine's output
z = x_hat*w_eff + b_eff where w_eff = weight[c]*(1 + scale[n, c]) is the effective weight, dz the
gradient at z (dy, or dy*act'(z) with a fused activation, z recomputed from x), and <.> the mean over
a group's M = Cg*S elements:
    dx      = rstd*(dzw - <dzw> - x_hat*<dzw*x_hat>),   dzw = dz*w_eff
    dweight = sum over n, positions of (1 + scale)*dz*x_hat
    dbias   = sum over n, positions of (1 + scale)*dz
    dshift  = per (n, c) sum of dz;   dscale = per (n, c) sum of dz*(x_hat*weight + bias)
Every path first forms per-(n, c) sums dz_sum = sum(dz) and dz_xc_sum = sum(dz*(x - mean_hi)) in a
small ACC workspace Partials (N, C, SPANS, 2) (accessor: partial_sums). Then x_hat sums follow from
sum(dz*x_hat) = rstd*(dz_xc_sum - mean_lo*dz_sum); dx needs only the group totals weighted by w_eff,
dzw_sum and dzw_xc_sum (dx_coefficients turns them into dx = a*dz + coef_x*(x - mean_hi) + coef_1);
dweight/dbias are a fixed-order reduction of the workspace over n and spans
(`_gn_bwd_dparams_kernel`), dscale/dshift per-(n, c) totals of it (`_gn_bwd_dscale_shift_kernel`).
Programs own blocks of R groups of one sample, as in the forward.
  fused: a program takes its groups' sums over all positions, then writes dx (the second read of
         x, dy hits L1/L2).
  split: `_gn_bwd_partial_sums_kernel` writes per-span sums of its chunk's channels (a group's
         channels may be cut into chunks, program axis 2, as in the forward), `_gn_bwd_split_dx_kernel`
         merges the whole block's spans in a fixed order and writes dx for its own (chunk, span) piece.
"""

import triton
import triton.language as tl

from ._tile import (
    channel_affine,
    channel_grad_sums,
    channel_partials,
    chunk_bounds,
    dx_coefficients,
    effective_weight,
    group_block,
    group_membership,
    group_size,
    load_stats,
    partial_sums,
    span_bounds,
    span_sums,
    sum_spans,
    to_channels,
    to_groups,
    write_span,
)


@triton.jit
def _gn_bwd_fused_kernel(
    X, DY, DX, W, B, Scale, Shift, Mean, MeanLo, Rstd, Partials, C, S, G, Cg,  # Partials: (N, C, 1, 2)
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
    NEEDS_DX: tl.constexpr, NEEDS_PARTIALS: tl.constexpr,  # DX, or Partials (for the parameters' gradients)
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(tl.program_id(0), G, Cg, C, R, LAYOUT)
    x_sample = X + n.to(tl.int64) * C * S
    dy_sample = DY + n.to(tl.int64) * C * S
    scale_n = Scale + n * C
    shift_n = Shift + n * C
    mean_hi, mean_lo, rstd = load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask)

    dzw_sum = tl.zeros([R], ACC)
    dzw_xc_sum = tl.zeros([R], ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        a, b = channel_affine(member, c, c < c_end, W, B, scale_n, shift_n, mean_lo, rstd, EPILOGUE, ACC)
        dz_sum, dz_xc_sum = channel_grad_sums(
            x_sample, dy_sample, to_channels(member, mean_hi), a, b, c, c_end, 0, S, C, S, BLOCK_C, BLOCK_S,
            EPILOGUE.ACTIVATION, LAYOUT, ACC,
        )  # fmt: skip
        if NEEDS_PARTIALS:
            dz_ptr, dz_xc_ptr = partial_sums(Partials, n.to(tl.int64) * C + c, 0, 1)
            tl.store(dz_ptr, dz_sum, mask=c < c_end)
            tl.store(dz_xc_ptr, dz_xc_sum, mask=c < c_end)
        if EPILOGUE.HAS_WEIGHT or EPILOGUE.HAS_SCALE:
            w = effective_weight(c, c < c_end, W, scale_n, EPILOGUE, ACC)
            dz_sum *= w
            dz_xc_sum *= w
        dzw_sum += to_groups(member, dz_sum)
        dzw_xc_sum += to_groups(member, dz_xc_sum)

    if NEEDS_DX:
        coef_x, coef_1 = dx_coefficients(dzw_sum, dzw_xc_sum, mean_lo, rstd, group_size(Cg, S, ACC))
        write_span(
            x_sample, DX + n.to(tl.int64) * C * S, W, B, scale_n, shift_n, mean_hi, mean_lo, rstd, c_begin, c_end,
            0, S, C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC, dy_sample, coef_x, coef_1, BACKWARD=True,
        )  # fmt: skip


@triton.jit
def _gn_bwd_partial_sums_kernel(
    X, DY, W, B, Scale, Shift, Mean, MeanLo, Rstd, Partials, block_offset, C, S, G, Cg, span, SPANS,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    """Per-(n, c, span) dz_sum, dz_xc_sum into Partials (N, C, SPANS, 2); W, B, Scale, Shift are read only
    with a fused activation (dz = dy*act'(z) needs z)."""
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    j = tl.program_id(1)
    s_begin, s_end = span_bounds(j, span, S)
    c_lo, c_hi = chunk_bounds(c_begin, c_end, CHUNK_C)
    x_sample = X + n.to(tl.int64) * C * S
    dy_sample = DY + n.to(tl.int64) * C * S
    mean_hi, mean_lo, rstd = load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        a, b = channel_affine(member, c, c < c_end, W, B, Scale + n * C, Shift + n * C, mean_lo, rstd, EPILOGUE, ACC)
        dz_sum, dz_xc_sum = channel_grad_sums(
            x_sample, dy_sample, to_channels(member, mean_hi), a, b, c, c_hi, s_begin, s_end, C, S, BLOCK_C,
            BLOCK_S, EPILOGUE.ACTIVATION, LAYOUT, ACC,
        )  # fmt: skip
        dz_ptr, dz_xc_ptr = partial_sums(Partials, n.to(tl.int64) * C + c, j, SPANS)
        tl.store(dz_ptr, dz_sum, mask=c < c_hi)
        tl.store(dz_xc_ptr, dz_xc_sum, mask=c < c_hi)


@triton.jit
def _gn_bwd_split_dx_kernel(
    X, DY, DX, W, B, Scale, Shift, Mean, MeanLo, Rstd, Partials, block_offset, C, S, G, Cg, span, SPANS,
    BLOCK_SPANS: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    j = tl.program_id(1)
    mean_hi, mean_lo, rstd = load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask)

    # Merge the spans' per-channel sums (fixed order), weight them, and total them per group.
    dzw_sum = tl.zeros([R], ACC)
    dzw_xc_sum = tl.zeros([R], ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_end
        spans = channel_partials(Partials, (n.to(tl.int64) * C + c)[:, None], SPANS)
        dz_sum = tl.zeros([BLOCK_C], ACC)
        dz_xc_sum = tl.zeros([BLOCK_C], ACC)
        for k0 in range(0, SPANS, BLOCK_SPANS):  # BLOCK_SPANS spans per step, in a fixed order
            k = k0 + tl.arange(0, BLOCK_SPANS)[None, :]
            mask = c_mask[:, None] & (k < SPANS)
            dz_ptr, dz_xc_ptr = span_sums(spans, k)
            dz_sum += tl.sum(tl.load(dz_ptr, mask=mask, other=0.0), axis=1)
            dz_xc_sum += tl.sum(tl.load(dz_xc_ptr, mask=mask, other=0.0), axis=1)
        if EPILOGUE.HAS_WEIGHT or EPILOGUE.HAS_SCALE:
            w = effective_weight(c, c_mask, W, Scale + n * C, EPILOGUE, ACC)
            dz_sum *= w
            dz_xc_sum *= w
        member = group_membership(c, c_begin, c_end, Cg, R)
        dzw_sum += to_groups(member, dz_sum)
        dzw_xc_sum += to_groups(member, dz_xc_sum)

    coef_x, coef_1 = dx_coefficients(dzw_sum, dzw_xc_sum, mean_lo, rstd, group_size(Cg, S, ACC))
    s_begin, s_end = span_bounds(j, span, S)
    c_lo, c_hi = chunk_bounds(c_begin, c_end, CHUNK_C)
    x_sample = X + n.to(tl.int64) * C * S
    dy_sample = DY + n.to(tl.int64) * C * S
    dx_sample = DX + n.to(tl.int64) * C * S
    write_span(
        x_sample, dx_sample, W, B, Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, c_lo, c_hi,
        s_begin, s_end, C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC, dy_sample, coef_x, coef_1, BACKWARD=True,
    )  # fmt: skip


@triton.jit
def _gn_bwd_dparams_kernel(
    Partials, MeanLo, Rstd, Scale, DW, DB, N, C, G, Cg, SPANS,  # Partials: (N, C, SPANS, 2)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEEDS_DW: tl.constexpr, NEEDS_DB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dweight[c] = sum_n (1 + scale)*rstd*(dz_xc_sum - mean_lo*dz_sum), dbias[c] = sum_n (1 + scale)*dz_sum,
    in a fixed order (n blocks, then spans): bitwise repeatable."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dw = tl.zeros([BLOCK_C], ACC)
    db = tl.zeros([BLOCK_C], ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        dz_sum, dz_xc_sum = sum_spans(Partials, n.to(tl.int64)[:, None] * C + c[None, :], mask, SPANS, ACC)
        if HAS_SCALE:  # the gradient reaching the affine is dz*(1 + scale[n, c])
            gain = 1.0 + tl.load(Scale + n[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
            dz_sum *= gain
            dz_xc_sum *= gain
        db += tl.sum(dz_sum, axis=0)
        if NEEDS_DW:
            stat = n[:, None] * G + (c // Cg)[None, :]
            rstd = tl.load(Rstd + stat, mask=mask, other=0.0)
            mean_lo = tl.load(MeanLo + stat, mask=mask, other=0.0)
            dw += tl.sum(rstd * (dz_xc_sum - mean_lo * dz_sum), axis=0)
    if NEEDS_DW:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=c_mask)
    if NEEDS_DB:
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=c_mask)


@triton.jit
def _gn_bwd_dscale_shift_kernel(
    Partials, W, B, MeanLo, Rstd, DScale, DShift, C, G, Cg, SPANS,  # Partials: (N, C, SPANS, 2)
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEEDS_DSCALE: tl.constexpr, NEEDS_DSHIFT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dshift[n, c] = dz_sum; dscale[n, c] = sum(dz*u) with u = x_hat*w + bias the affine output before
    the scale, so sum(dz*u) = a*dz_xc_sum + b*dz_sum with a = rstd*w, b = bias - mean_lo*a."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dz_sum, dz_xc_sum = sum_spans(Partials, n.to(tl.int64) * C + c, c_mask, SPANS, ACC)
    if NEEDS_DSHIFT:
        tl.store(DShift + n * C + c, dz_sum.to(DShift.dtype.element_ty), mask=c_mask)
    if NEEDS_DSCALE:
        stat = n * G + c // Cg
        a = tl.load(Rstd + stat, mask=c_mask, other=0.0)
        if HAS_WEIGHT:
            a *= tl.load(W + c, mask=c_mask, other=0.0).to(ACC)
        b = -tl.load(MeanLo + stat, mask=c_mask, other=0.0) * a
        if HAS_BIAS:
            b += tl.load(B + c, mask=c_mask, other=0.0).to(ACC)
        tl.store(DScale + n * C + c, (a * dz_xc_sum + b * dz_sum).to(DScale.dtype.element_ty), mask=c_mask)
