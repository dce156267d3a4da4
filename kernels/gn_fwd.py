"""GroupNorm forward kernels.

Every program owns a block of R consecutive groups of one sample (`group_block`): R = 1 for large
NCHW groups, several for tiny groups, all G for channels_last so that a tile reads whole pixels.
Two paths, chosen on the host (gn_triton/_launch.py, _tuning.py):
  fused: one launch; a program takes its groups' statistics over all positions, then normalises
         them (the second read hits L1/L2). For blocks that already fill the GPU.
  split: each block's positions are cut into spans (program axis 1), and a group's channels into
         chunks (axis 2; NCHW); `_gn_fwd_partial_stats_kernel` writes one (count, mean, M2) per group
         and (chunk, span) piece to a small fp32 workspace, of x less the group's reference (a value
         inside the group's data, group_reference) that it stores beside them;
         `_gn_fwd_split_apply_kernel` merges a group's partials (every program of the block
         merges them in the same order: deterministic, no atomics) and normalises its own piece. For
         few blocks (batch 1) or blocks too large to hold.
The affine may be followed by a per-sample scale and shift ((N, C): z*(1 + scale) + shift, the
diffusion "scale-shift norm") and a fused activation (ACTIVATION), all applied in registers.
Split launches take blocks in waves ([block_offset, block_offset + grid blocks)) so that the host can
keep a wave's bytes inside L2 between the two launches.
"""

import triton
import triton.language as tl

from ._tile import (
    chunk_bounds,
    finalize_stats,
    group_block,
    group_partials,
    group_reference,
    load_pilot,
    partial_stats,
    shifted_stats,
    span_bounds,
    span_stats,
    store_stats,
    write_span,
)


@triton.jit
def _gn_fwd_fused_kernel(
    X, Y, W, B, Scale, Shift, Mean, MeanLo, Rstd, C, S, G, Cg, eps_hi, eps_lo,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(tl.program_id(0), G, Cg, C, R, LAYOUT)
    x_sample = X + n.to(tl.int64) * C * S
    y_sample = Y + n.to(tl.int64) * C * S

    # Statistics of x - reference (a value inside the group's data), so that a first element far from
    # the rest costs the mean no rounding.
    pilot = load_pilot(x_sample, c_begin, c_end, Cg, C, S, R, LAYOUT, ACC)
    reference = group_reference(x_sample, pilot, c_begin, c_end, Cg, C, S, R, BLOCK_S, LAYOUT, ACC)
    count, mean, m2 = shifted_stats(
        x_sample, reference, c_begin, c_end, 0, S, C, S, Cg, R, BLOCK_C, BLOCK_S, LAYOUT, ACC
    )
    mean_hi, mean_lo, rstd = finalize_stats(count, mean, m2, reference, eps_hi, eps_lo, ACC)
    store_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask, mean_hi, mean_lo, rstd)
    write_span(
        x_sample, y_sample, W, B, Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, c_begin, c_end, 0, S,
        C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC,
    )  # fmt: skip


@triton.jit
def _gn_fwd_partial_stats_kernel(
    X, Partials, block_offset, C, S, G, Cg, span, SPANS,  # Partials: (N*G, SPANS, 4)
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
    CHUNK_C: tl.constexpr,
):  # fmt: skip
    """Count, mean and M2 of x - reference over one (chunk, span) piece, and the reference, at
    Partials[n*G + group, chunk*spans + span]."""
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    j = tl.program_id(1)
    s_begin, s_end = span_bounds(j, span, S)
    c_lo, c_hi = chunk_bounds(c_begin, c_end, CHUNK_C)
    x_sample = X + n.to(tl.int64) * C * S

    pilot = load_pilot(x_sample, c_begin, c_end, Cg, C, S, R, LAYOUT, ACC)
    reference = group_reference(x_sample, pilot, c_begin, c_end, Cg, C, S, R, BLOCK_S, LAYOUT, ACC)
    count, mean, m2 = shifted_stats(
        x_sample, reference, c_lo, c_hi, s_begin, s_end, C, S, Cg, R, BLOCK_C, BLOCK_S, LAYOUT, ACC
    )
    piece = tl.program_id(2) * tl.num_programs(1) + j
    count_ptr, mean_ptr, m2_ptr, ref_ptr = partial_stats(Partials, n.to(tl.int64) * G + gid, piece, SPANS)
    tl.store(count_ptr, count, mask=gid_mask)
    tl.store(mean_ptr, mean, mask=gid_mask)
    tl.store(m2_ptr, m2, mask=gid_mask)
    tl.store(ref_ptr, reference, mask=gid_mask)


@triton.jit
def _gn_fwd_split_apply_kernel(
    X, Y, W, B, Scale, Shift, Partials, Mean, MeanLo, Rstd, block_offset, C, S, G, Cg, span, SPANS, eps_hi, eps_lo,
    BLOCK_SPANS: tl.constexpr,  # pieces merged per step
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    n, c_begin, c_end, gid, gid_mask = group_block(block_offset + tl.program_id(0), G, Cg, C, R, LAYOUT)
    j = tl.program_id(1)
    x_sample = X + n.to(tl.int64) * C * S
    y_sample = Y + n.to(tl.int64) * C * S

    # Merge each group's partials in a fixed order, BLOCK_SPANS pieces at a time (two passes over the
    # small workspace), relative to the first piece's reference (every piece's is the same value, up
    # to the rounding of its reduction: the difference is exact): mean = sum(n_k m_k)/sum(n_k), then
    # M2 = sum(M2_k) + sum(n_k (m_k - mean)^2).
    spans = group_partials(Partials, (n.to(tl.int64) * G + gid)[:, None], SPANS)
    reference = tl.load(partial_stats(Partials, n.to(tl.int64) * G + gid, 0, SPANS)[3], mask=gid_mask, other=0.0)
    count = tl.zeros([R], ACC)
    total = tl.zeros([R], ACC)
    for k0 in range(0, SPANS, BLOCK_SPANS):
        count_ptr, mean_ptr, _, ref_ptr, k_mask = span_stats(spans, gid_mask, k0, SPANS, BLOCK_SPANS)
        part_count = tl.load(count_ptr, mask=k_mask, other=0.0)
        part_mean = tl.load(mean_ptr, mask=k_mask, other=0.0) + (
            tl.load(ref_ptr, mask=k_mask, other=0.0) - reference[:, None]
        )
        count += tl.sum(part_count, axis=1)
        total += tl.sum(tl.where(k_mask, part_count * part_mean, 0.0), axis=1)
    mean = total / tl.maximum(count, 1.0)  # count 0: padding groups
    m2 = tl.zeros([R], ACC)
    for k0 in range(0, SPANS, BLOCK_SPANS):
        count_ptr, mean_ptr, m2_ptr, ref_ptr, k_mask = span_stats(spans, gid_mask, k0, SPANS, BLOCK_SPANS)
        part_count = tl.load(count_ptr, mask=k_mask, other=0.0)
        part_mean = tl.load(mean_ptr, mask=k_mask, other=0.0) + (
            tl.load(ref_ptr, mask=k_mask, other=0.0) - reference[:, None]
        )
        dev = part_mean - mean[:, None]
        m2 += tl.sum(tl.where(k_mask, tl.load(m2_ptr, mask=k_mask, other=0.0) + part_count * dev * dev, 0.0), axis=1)

    mean_hi, mean_lo, rstd = finalize_stats(count, mean, m2, reference, eps_hi, eps_lo, ACC)
    if (j == 0) & (tl.program_id(2) == 0):
        store_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask, mean_hi, mean_lo, rstd)
    s_begin, s_end = span_bounds(j, span, S)
    c_lo, c_hi = chunk_bounds(c_begin, c_end, CHUNK_C)
    write_span(
        x_sample, y_sample, W, B, Scale + n * C, Shift + n * C, mean_hi, mean_lo, rstd, c_lo, c_hi,
        s_begin, s_end, C, S, Cg, R, BLOCK_C, BLOCK_S, EPILOGUE, LAYOUT, ACC,
    )  # fmt: skip
