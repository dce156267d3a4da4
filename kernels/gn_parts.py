"""GroupNorm's elementwise passes with statistics taken elsewhere: the kernels of gn_triton.stats and
gn_triton.distributed, where a group's statistics (or its gradient sums) combine the partials of
several tensors, e.g. the shards of one sample held by several GPUs.

Statistics of a piece are the forward's `_gn_fwd_partial_stats_kernel`, its per-(n, c) gradient sums
the backward's `_gn_bwd_partial_sums_kernel`, and the parameters' gradients its reduction kernels; the
two kernels here do the passes that need the merged values:
  `_gn_normalize_kernel`  y = act((x_hat*w + b)*(1 + scale) + shift) with given (N, G) Mean, MeanLo, Rstd;
  `_gn_dx_kernel`         dx = a*dz + coef_x*(x - mean_hi) + coef_1 with given (N, G) CoefX, Coef1
                          (the group coefficients of dx_coefficients, formed from the merged sums).
Both take blocks of R groups of one sample over one span of positions per program (grid: blocks x
spans), in waves as the split path (block_offset). Arguments are named as in _tile.py.
"""

import triton
import triton.language as tl

from ._tile import group_block, load_stats, span_bounds, write_span


@triton.jit
def _gn_normalize_kernel(
    X, Y, W, B, Scale, Shift, Mean, MeanLo, Rstd, block_offset, C, S, G, Cg, span,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    mean_hi, mean_lo, rstd = load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask)
    s_begin, s_end = span_bounds(tl.program_id(1), span, S)
    sample = n.to(tl.int64) * C * S
    write_span(
        X + sample, Y + sample, W, B, Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, c_begin, c_end,
        s_begin, s_end, C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC,
    )  # fmt: skip


@triton.jit
def _gn_dx_kernel(
    X, DY, DX, W, B, Scale, Shift, Mean, MeanLo, Rstd, CoefX, Coef1, block_offset, C, S, G, Cg, span,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    mean_hi, mean_lo, rstd = load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask)
    coef_x = tl.load(CoefX + n * G + gid, mask=gid_mask, other=0.0)
    coef_1 = tl.load(Coef1 + n * G + gid, mask=gid_mask, other=0.0)
    s_begin, s_end = span_bounds(tl.program_id(1), span, S)
    sample = n.to(tl.int64) * C * S
    write_span(
        X + sample, DX + sample, W, B, Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, c_begin, c_end,
        s_begin, s_end, C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC, DY + sample, coef_x, coef_1,
        BACKWARD=True,
    )  # fmt: skip
