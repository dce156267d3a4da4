"""GroupNorm forward kernels.

Two paths, chosen on the host (gn_triton/_launch.py):
  fused: one launch; a program owns R whole groups of one sample, takes their statistics, then
         normalises them (the second read of a row hits L1/L2). For rows that already fill the GPU.
  split: each group is cut into SPLIT spans of positions; `_gn_fwd_partial_stats_kernel` writes one
         (count, mean, M2) per span to a small fp32 workspace, `_gn_fwd_split_apply_kernel` merges a
         row's partials (every program of the row merges them in the same order: deterministic, no
         atomics) and normalises its own span. For few rows (batch 1) or rows too large to hold.
The forward may end in a fused activation (ACTIVATION), applied to the affine output in registers.
Both take rows in waves ([row_offset, row_offset + grid rows)) so that the host can keep a wave's
bytes inside L2 between the two split launches.
"""

import triton
import triton.language as tl

from ._tile import finalize_stats, load_shift, normalize_span, shifted_stats


@triton.jit
def _gn_fwd_fused_kernel(
    X,  # (N, C, S) input, fp16/bf16/fp32/fp64, layout given by CHANNELS_LAST
    Y,  # (N, C, S) output, X's dtype and layout
    W,  # (C,) weight (any float dtype); unused unless HAS_WEIGHT
    B,  # (C,) bias (any float dtype); unused unless HAS_BIAS
    Mean,  # (N, G) ACC: group mean rounded to ACC
    MeanLo,  # (N, G) ACC: mean - Mean (the rounding residual)
    Rstd,  # (N, G) ACC: 1/sqrt(var + eps)
    C, S, G, Cg, eps,
    R: tl.constexpr,  # groups per program
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 SiLU, 2 GELU, 3 GELU (tanh), applied after the affine
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    blocks_per_sample = tl.cdiv(G, R)
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    g_begin = (pid % blocks_per_sample) * R
    c_begin = g_begin * Cg
    c_end = tl.minimum(c_begin + R * Cg, C)
    x_sample = X + n.to(tl.int64) * C * S
    y_sample = Y + n.to(tl.int64) * C * S

    shift = load_shift(x_sample, c_begin, c_end, Cg, C, S, R, CHANNELS_LAST, ACC)
    count, mean, m2 = shifted_stats(
        x_sample, shift, c_begin, c_end, 0, S, C, S, Cg, R, BLOCK_C, BLOCK_S, CHANNELS_LAST, INDEX_64, ACC
    )
    mean_hi, mean_lo, rstd = finalize_stats(count, mean, m2, shift, eps, ACC)
    g = g_begin + tl.arange(0, R)
    stat = n * G + g
    tl.store(Mean + stat, mean_hi, mask=g < G)
    tl.store(MeanLo + stat, mean_lo, mask=g < G)
    tl.store(Rstd + stat, rstd, mask=g < G)
    normalize_span(
        x_sample, y_sample, W, B, mean_hi, mean_lo, rstd, c_begin, c_end, 0, S, C, S, Cg,
        R, BLOCK_C, BLOCK_S, HAS_WEIGHT, HAS_BIAS, ACTIVATION, CHANNELS_LAST, INDEX_64, ACC,
    )  # fmt: skip


@triton.jit
def _gn_fwd_partial_stats_kernel(
    X,  # (N, C, S) input
    Partials,  # (N*G, SPLIT, 3) ACC: count, mean and M2 of x - shift over each span
    row_offset, C, S, G, Cg, span,
    SPLIT,  # spans per row (runtime: it only sizes the workspace)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = row_offset + tl.program_id(0)
    j = tl.program_id(1)
    n = row // G
    c_begin = (row % G) * Cg
    c_end = c_begin + Cg
    s_begin = j * span
    s_end = tl.minimum(s_begin + span, S)
    x_sample = X + n.to(tl.int64) * C * S

    shift = load_shift(x_sample, c_begin, c_end, Cg, C, S, 1, CHANNELS_LAST, ACC)
    count, mean, m2 = shifted_stats(
        x_sample, shift, c_begin, c_end, s_begin, s_end, C, S, Cg, 1, BLOCK_C, BLOCK_S,
        CHANNELS_LAST, INDEX_64, ACC,
    )  # fmt: skip
    part = Partials + (row.to(tl.int64) * SPLIT + j) * 3 + tl.arange(0, 1)
    tl.store(part, count)
    tl.store(part + 1, mean)
    tl.store(part + 2, m2)


@triton.jit
def _gn_fwd_split_apply_kernel(
    X,  # (N, C, S) input
    Y,  # (N, C, S) output, X's dtype and layout
    W,  # (C,) weight; unused unless HAS_WEIGHT
    B,  # (C,) bias; unused unless HAS_BIAS
    Partials,  # (N*G, SPLIT, 3) ACC, from _gn_fwd_partial_stats_kernel
    Mean,  # (N, G) ACC
    MeanLo,  # (N, G) ACC
    Rstd,  # (N, G) ACC
    row_offset, C, S, G, Cg, span, SPLIT, eps,
    BLOCK_SPLIT: tl.constexpr,  # next power of two >= SPLIT
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = row_offset + tl.program_id(0)
    j = tl.program_id(1)
    n = row // G
    c_begin = (row % G) * Cg
    c_end = c_begin + Cg
    x_sample = X + n.to(tl.int64) * C * S
    y_sample = Y + n.to(tl.int64) * C * S

    # Merge the row's partials: mean = sum(n_j m_j)/sum(n_j), M2 = sum(M2_j) + sum(n_j (m_j - mean)^2).
    k = tl.arange(0, BLOCK_SPLIT)[None, :]
    k_mask = k < SPLIT
    part = Partials + row.to(tl.int64) * SPLIT * 3 + k * 3
    part_count = tl.load(part, mask=k_mask, other=0.0)
    part_mean = tl.load(part + 1, mask=k_mask, other=0.0)
    part_m2 = tl.load(part + 2, mask=k_mask, other=0.0)
    count = tl.sum(part_count, axis=1)
    mean = tl.sum(part_count * part_mean, axis=1) / count
    dev = part_mean - mean[:, None]
    m2 = tl.sum(part_m2, axis=1) + tl.sum(part_count * dev * dev, axis=1)

    shift = load_shift(x_sample, c_begin, c_end, Cg, C, S, 1, CHANNELS_LAST, ACC)
    mean_hi, mean_lo, rstd = finalize_stats(count, mean, m2, shift, eps, ACC)
    if j == 0:
        stat = row + tl.arange(0, 1)
        tl.store(Mean + stat, mean_hi)
        tl.store(MeanLo + stat, mean_lo)
        tl.store(Rstd + stat, rstd)
    s_begin = j * span
    s_end = tl.minimum(s_begin + span, S)
    normalize_span(
        x_sample, y_sample, W, B, mean_hi, mean_lo, rstd, c_begin, c_end, s_begin, s_end, C, S, Cg,
        1, BLOCK_C, BLOCK_S, HAS_WEIGHT, HAS_BIAS, ACTIVATION, CHANNELS_LAST, INDEX_64, ACC,
    )  # fmt: skip
