"""Building blocks shared by the forward and backward GroupNorm kernels.

Every kernel views its input as (N, C, S): S is the flattened spatial extent. Two memory layouts:
  CHANNELS_LAST=False: offset(n, c, s) = (n*C + c)*S + s   (NCHW, NCDHW, (N, C, L), (N, C))
  CHANNELS_LAST=True:  offset(n, c, s) = (n*S + s)*C + c   (NHWC, NDHWC)

A program works on a block of R consecutive groups of one sample (R = 1 except for tiny rows), over
a span of spatial positions, in tiles of [BLOCK_C channels x BLOCK_S positions]. Per-group values
(vectors of length R) and per-channel values (vectors of length BLOCK_C) are moved between each other
with a [R, BLOCK_C] membership mask and `tl.where`, never a multiply, so that a NaN in one group never
reaches another.

Numerics: every load is upcast to ACC (fp32, or fp64 for fp64 input). Statistics are taken of
`x - reference`, where the reference is a value inside the group's data (group_reference: the group's
first element, its `pilot`, plus the mean of x - pilot over its first tile row): for data with a large
common offset, `x - reference` is exact and small, so the mean of the row is carried as an fp32 pair
`mean_hi + mean_lo` and the normalisation `(x - mean_hi) - mean_lo` loses nothing to the
quantisation of a large fp32 mean; a first element far from the rest costs nothing either. Main
loops accumulate per lane (each thread sums its own elements, no reduction, barrier or shuffle inside
a loop over elements) and reduce once after the loop; the statistics sum `x - shift` with a shift
inside the data (shifted_stats), and the split paths' partials are merged with Chan's parallel
update, never as E[x^2] - E[x]^2.

Kernel arguments: a name means the same in every kernel.
  X, DY           (N, C, S) input and output gradient; Y, DX: outputs in X's dtype and layout
  W, B            (C,) weight and bias (any float dtype); Scale, Shift: (N, C) per-sample modulation,
                  z*(1 + scale) + shift. Each is read only where EPILOGUE has it (else a placeholder).
  DW, DB, DScale, DShift   their gradients, each in its tensor's dtype; written only where NEEDS_* asks
  Mean, MeanLo    (N, G) in ACC: the group mean rounded to ACC and the rounding residual; Rstd, (N, G)
                  1/sqrt(var + eps); eps_hi + eps_lo = eps (fp32 each, see finalize_stats)
  Partials        the split paths' workspace in ACC: forward (N*G, SPANS, 4), backward (N, C, SPANS, 2),
                  read and written through its accessors below; SPANS spans of `span` positions each
                  (the forward's SPANS counts (chunk, span) pieces: chunks x spans)
  CHUNK_C         the split paths' channels per program (chunk_bounds, program axis 2; 0: the block's)
  block_offset    the first block of this launch's wave (split paths)
  R, BLOCK_C, BLOCK_S   the plan: groups per program and the tile
  EPILOGUE, LAYOUT      the constexpr bundles below; ACC: the accumulator dtype (fp32, fp64 for fp64)
"""

from typing import NamedTuple

import triton
import triton.language as tl


class Epilogue(NamedTuple):
    """What follows the normalisation, as constexprs: z = (x_hat*weight + bias)*(1 + scale) + shift,
    y = act(z). A flag off means the tensor is absent (its argument is a placeholder, never read)."""

    HAS_WEIGHT: tl.constexpr
    HAS_BIAS: tl.constexpr
    HAS_SCALE: tl.constexpr
    HAS_SHIFT: tl.constexpr
    ACTIVATION: tl.constexpr  # 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh approximation)


class Layout(NamedTuple):
    """How the (N, C, S) view is addressed, as constexprs."""

    CHANNELS_LAST: tl.constexpr  # NHWC / NDHWC (offsets above)
    INDEX_64: tl.constexpr  # offsets in int64: the tensor has 2^31 elements or more
    # A power of two that divides Cg (and so C and every block's first channel), up to a 16-byte vector
    # of x's elements: in channels_last a tile row's channels then start on a vector boundary, which
    # the compiler cannot see in a runtime Cg such as 40 (only multiples of 16 are specialised), and
    # the loads along channels are 128-bit. 1 where it does not matter (NCHW).
    C_MULTIPLE: tl.constexpr = 1
    # NCHW rows whose length S is not a multiple of 16 (7x7, 14x14 maps): a power of two that divides S,
    # up to a 16-byte vector, so that rows start on it (S = 196: 4 elements, 64-bit bf16 loads). 1 where
    # the runtime already sees S as a multiple of 16, and in channels_last.
    S_MULTIPLE: tl.constexpr = 1


@triton.jit
def tile_offsets(c, s, C, S, LAYOUT: tl.constexpr):
    """[BLOCK_C, BLOCK_S] element offsets inside one sample for channels `c` and positions `s`."""
    if LAYOUT.INDEX_64:
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    if LAYOUT.CHANNELS_LAST:
        return s[None, :] * C + c[:, None]
    else:
        rows = c * S
        if LAYOUT.S_MULTIPLE > 1:  # a multiple of S, and so of S_MULTIPLE
            rows = tl.multiple_of(rows, tl.constexpr(LAYOUT.S_MULTIPLE))
        return rows[:, None] + s[None, :]


@triton.jit
def group_block(block, G, Cg, C, R: tl.constexpr, LAYOUT: tl.constexpr):
    """The block-th block of R consecutive groups of one sample (blocks numbered sample by sample):
    (n, first channel c_begin, end channel c_end, group ids gid [R], their mask [R])."""
    blocks_per_sample = tl.cdiv(G, R)
    n = block // blocks_per_sample
    first = (block % blocks_per_sample) * R
    c_begin = first * Cg
    c_end = tl.minimum(c_begin + R * Cg, C)
    if LAYOUT.C_MULTIPLE > 1:  # both are multiples of Cg, and so of C_MULTIPLE
        c_begin = tl.multiple_of(c_begin, tl.constexpr(LAYOUT.C_MULTIPLE))
        c_end = tl.multiple_of(c_end, tl.constexpr(LAYOUT.C_MULTIPLE))
    gid = first + tl.arange(0, R)
    return n, c_begin, c_end, gid, gid < G


@triton.jit
def span_bounds(j, span, S):
    """Positions [s_begin, s_end) of span j (s_begin + span may pass 2^31: the end is formed without it)."""
    s_begin = j * span
    return s_begin, s_begin + tl.minimum(span, S - s_begin)


@triton.jit
def chunk_bounds(c_begin, c_end, CHUNK_C: tl.constexpr):
    """Channels [c_lo, c_hi) of the chunk of this program (program axis 2) of a block's channels
    [c_begin, c_end): the split path may cut a group's channels into chunks of CHUNK_C (NCHW, one
    group per program) so that its tiles' rows divide them; CHUNK_C = 0: the whole block. A constexpr,
    so that the compiler still sees the channels' alignment (channels_last loads stay vectorised)."""
    if CHUNK_C == 0:
        return c_begin, c_end
    c_lo = c_begin + tl.program_id(2) * CHUNK_C
    return c_lo, tl.minimum(c_lo + CHUNK_C, c_end)


@triton.jit
def store_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask, mean_hi, mean_lo, rstd):
    """The (N, G) statistics of a block's groups."""
    stat = n * G + gid
    tl.store(Mean + stat, mean_hi, mask=gid_mask)
    tl.store(MeanLo + stat, mean_lo, mask=gid_mask)
    tl.store(Rstd + stat, rstd, mask=gid_mask)


@triton.jit
def load_stats(Mean, MeanLo, Rstd, n, G, gid, gid_mask):
    stat = n * G + gid
    mean_hi = tl.load(Mean + stat, mask=gid_mask, other=0.0)
    mean_lo = tl.load(MeanLo + stat, mask=gid_mask, other=0.0)
    rstd = tl.load(Rstd + stat, mask=gid_mask, other=0.0)
    return mean_hi, mean_lo, rstd


@triton.jit
def group_membership(c, c_begin, c_end, Cg, R: tl.constexpr):
    """[R, BLOCK_C] mask: channel c belongs to the r-th group of the program's block."""
    return ((c - c_begin)[None, :] // Cg == tl.arange(0, R)[:, None]) & (c < c_end)[None, :]


@triton.jit
def to_channels(member, per_group):
    """Broadcast a per-group vector [R] to the channels of a tile [BLOCK_C]."""
    return tl.sum(tl.where(member, per_group[:, None], 0.0), axis=0)


@triton.jit
def to_groups(member, per_channel):
    """Sum a per-channel vector [BLOCK_C] into the groups it belongs to [R]."""
    return tl.sum(tl.where(member, per_channel[None, :], 0.0), axis=1)


@triton.jit
def load_pilot(x_sample, c_begin, c_end, Cg, C, S, R: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr):
    """The pilot value of each of the R groups: its first element (channel gid*Cg, position 0)."""
    c = c_begin + tl.arange(0, R) * Cg
    if LAYOUT.CHANNELS_LAST:
        off = c
    else:
        off = c.to(tl.int64) * S
    return tl.load(x_sample + off, mask=c < c_end, other=0.0).to(ACC)


@triton.jit
def group_channels(c_begin, c_end, Cg, R: tl.constexpr):
    """The first channel of each of the R groups of a block [R], and how many of its channels lie in
    [c_begin, c_end) (Cg, or 0 for padding groups past G)."""
    first = c_begin + tl.arange(0, R) * Cg
    return first, tl.minimum(tl.maximum(c_end - first, 0), Cg)


@triton.jit
def shifted_stats(
    x_sample, pilot, c_begin, c_end, s_begin, s_end, C, S, Cg,
    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Count, mean and M2 (sum of squared deviations) of `x - pilot` for each of R groups.

    Covers channels [c_begin, c_end) and positions [s_begin, s_end) of one sample. Every lane keeps
    running sums of its own elements' e = x - shift and e^2 (no reduction, barrier or shuffle in the
    loop); the lanes are summed once after it, and M2 = sum(e^2) - sum(e)^2/count. The shift is the
    group's pilot plus the mean of `x - pilot` over the first BLOCK_S positions of the group's first
    channel, so it lies within the data: the cancellation in M2 is at most 1 + count/(those positions),
    whereas the pilot alone (e.g. an outlier first element) can be arbitrarily far from the mean.
    """
    first, channels = group_channels(c_begin, c_end, Cg, R)
    s = s_begin + tl.arange(0, BLOCK_S)
    head_mask = (channels > 0)[:, None] & (s < s_end)[None, :]
    head = tl.load(x_sample + tile_offsets(first, s, C, S, LAYOUT), mask=head_mask, other=0.0).to(ACC)
    head_count = tl.minimum(s_end - s_begin, BLOCK_S).to(ACC)
    shift = pilot + tl.sum(tl.where(head_mask, head - pilot[:, None], 0.0), axis=1) / head_count
    total_e = tl.zeros([R], ACC)
    total_e2 = tl.zeros([R], ACC)
    sum_e = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    sum_e2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    s_full = s_begin + (s_end - s_begin) // BLOCK_S * BLOCK_S  # the end of the span's whole tiles
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        shift_c = to_channels(member, shift)
        c_mask = c < c_end
        row_mask = c_mask[:, None] & (tl.arange(0, BLOCK_S) >= 0)[None, :]
        # Whole tiles first (rows past c_end load 0 and shift_c is 0 there: they add 0), then the
        # span's last, partial tile, where masked positions are zeroed.
        for s0 in range(s_begin, s_full, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            x = tl.load(x_sample + tile_offsets(c, s, C, S, LAYOUT), mask=row_mask, other=0.0)
            e = x.to(ACC) - shift_c[:, None]
            sum_e += e
            sum_e2 += e * e
        if s_full < s_end:
            s = s_full + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < s_end)[None, :]
            x = tl.load(x_sample + tile_offsets(c, s, C, S, LAYOUT), mask=mask, other=0.0)
            e = tl.where(mask, x.to(ACC) - shift_c[:, None], 0.0)
            sum_e += e
            sum_e2 += e * e
        if R > 1:  # a lane's row holds another group's channel in the next channel block: fold now
            total_e += to_groups(member, tl.sum(sum_e, axis=1))
            total_e2 += to_groups(member, tl.sum(sum_e2, axis=1))
            sum_e = tl.zeros([BLOCK_C, BLOCK_S], ACC)
            sum_e2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    if R == 1:  # every row of every channel block is the one group's: fold once
        total_e += tl.sum(tl.sum(sum_e, axis=1), axis=0)
        total_e2 += tl.sum(tl.sum(sum_e2, axis=1), axis=0)
    # In ACC: a group may hold 2^31 elements or more. A cast, not .to: with S = 1 (a constexpr) this is an int.
    count = channels.to(ACC) * tl.cast(s_end - s_begin, ACC)
    mean_e = total_e / tl.maximum(count, 1.0)
    m2 = total_e2 - total_e * mean_e
    return count, (shift - pilot) + mean_e, tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def finalize_stats(count, mean_shifted, m2, pilot, eps_hi, eps_lo, ACC: tl.constexpr):
    """(mean_hi, mean_lo, rstd) from the statistics of x - pilot; mean_hi + mean_lo = pilot + mean_shifted
    exactly (TwoSum), and mean_hi is the mean rounded to ACC."""
    var = m2 / tl.maximum(count, 1.0)  # count is 0 only for padding groups past G
    # Triton passes Python floats as fp32, so eps arrives as an fp32 pair with eps_hi + eps_lo = eps
    # to ~2^-48 relative: exact enough for fp64 input. In fp32, eps_hi + eps_lo rounds to eps_hi.
    if ACC == tl.float64:
        rstd = 1.0 / tl.sqrt(var + (tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)))
    else:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps_hi))
    mean_hi = pilot + mean_shifted
    part = mean_hi - pilot
    mean_lo = (pilot - (mean_hi - part)) + (mean_shifted - part)
    return mean_hi, mean_lo, rstd


# Fused activations after the affine (Epilogue.ACTIVATION). The backward recomputes the pre-activation
# z from x and the statistics.
@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))  # 0.5 z (1 + tanh u)
    else:
        return z


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d activation(z) / dz."""
    if ACTIVATION == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == 2:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))  # tanh u
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        return z * 0.0 + 1.0


@triton.jit
def channel_affine(
    member, c, c_mask, W, B, Scale_n, Shift_n, mean_lo, rstd, EPILOGUE: tl.constexpr, ACC: tl.constexpr
):  # fmt: skip
    """Per-channel (a, b) of the folded affine z = (x - mean_hi)*a + b of one sample:
    a = rstd*w*(1 + scale), b = (bias - mean_lo*rstd*w)*(1 + scale) + shift, i.e.
    z = (x_hat*w + bias)*(1 + scale) + shift with the sample's scale/shift (N, C) rows."""
    a = to_channels(member, rstd)
    if EPILOGUE.HAS_WEIGHT:
        a *= tl.load(W + c, mask=c_mask, other=0.0).to(ACC)
    b = -to_channels(member, mean_lo) * a
    if EPILOGUE.HAS_BIAS:
        b += tl.load(B + c, mask=c_mask, other=0.0).to(ACC)
    if EPILOGUE.HAS_SCALE:
        gain = 1.0 + tl.load(Scale_n + c, mask=c_mask, other=0.0).to(ACC)
        a *= gain
        b *= gain
    if EPILOGUE.HAS_SHIFT:
        b += tl.load(Shift_n + c, mask=c_mask, other=0.0).to(ACC)
    return a, b


@triton.jit
def effective_weight(c, c_mask, W, Scale_n, EPILOGUE: tl.constexpr, ACC: tl.constexpr):
    """w*(1 + scale) per channel of one sample: the weight the normalised value is multiplied by."""
    w = tl.zeros(c.shape, ACC) + 1.0
    if EPILOGUE.HAS_WEIGHT:
        w = tl.load(W + c, mask=c_mask, other=0.0).to(ACC)
    if EPILOGUE.HAS_SCALE:
        w *= 1.0 + tl.load(Scale_n + c, mask=c_mask, other=0.0).to(ACC)
    return w


@triton.jit
def elementwise(x_sample, dy_sample, offs, mask, a, b, hi, kx, k1, EPILOGUE: tl.constexpr, ACC: tl.constexpr,
                BACKWARD: tl.constexpr):  # fmt: skip
    """One tile of write_span: y, or dx (kx, k1: the channels' coef_x, coef_1)."""
    if BACKWARD:
        xc = tl.load(x_sample + offs, mask=mask, other=0.0).to(ACC) - hi[:, None]
        dz = tl.load(dy_sample + offs, mask=mask, other=0.0).to(ACC)
        if EPILOGUE.ACTIVATION != 0:
            dz *= activation_grad(xc * a[:, None] + b[:, None], EPILOGUE.ACTIVATION)
        return a[:, None] * dz + (kx[:, None] * xc + k1[:, None])  # two FMAs
    else:
        x = tl.load(x_sample + offs, mask=mask, other=0.0).to(ACC)
        return activation((x - hi[:, None]) * a[:, None] + b[:, None], EPILOGUE.ACTIVATION)


@triton.jit
def write_span(
    x_sample, out_sample, W, B, Scale_n, Shift_n, mean_hi, mean_lo, rstd, c_begin, c_end, s_begin, s_end,
    C, S, Cg, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EPILOGUE: tl.constexpr,
    LAYOUT: tl.constexpr, ACC: tl.constexpr, dy_sample=None, coef_x=None, coef_1=None, BACKWARD: tl.constexpr = False,
):  # fmt: skip
    """The elementwise pass over a span, with the folded affine's per-channel a, b (channel_affine):
    forward:  y = act((x - mean_hi)*a + b)   (one subtract and one FMA per element);
    backward: dx = a*dz + coef_x*(x - mean_hi) + coef_1 with dz = dy, or dy*act'(z) (dx_coefficients)."""
    s_full = s_begin + (s_end - s_begin) // BLOCK_S * BLOCK_S  # the end of the span's whole tiles
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        member = group_membership(c, c_begin, c_end, Cg, R)
        c_mask = c < c_end
        a, b = channel_affine(member, c, c_mask, W, B, Scale_n, Shift_n, mean_lo, rstd, EPILOGUE, ACC)
        hi = to_channels(member, mean_hi)
        kx = hi  # placeholders in the forward
        k1 = hi
        if BACKWARD:
            kx = to_channels(member, coef_x)
            k1 = to_channels(member, coef_1)
        row_mask = c_mask[:, None] & (tl.arange(0, BLOCK_S) >= 0)[None, :]
        for s0 in range(s_begin, s_full, BLOCK_S):  # whole tiles, then the span's last, partial one
            offs = tile_offsets(c, s0 + tl.arange(0, BLOCK_S), C, S, LAYOUT)
            out = elementwise(x_sample, dy_sample, offs, row_mask, a, b, hi, kx, k1, EPILOGUE, ACC, BACKWARD)
            tl.store(out_sample + offs, out.to(out_sample.dtype.element_ty), mask=row_mask)
        if s_full < s_end:
            s = s_full + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < s_end)[None, :]
            offs = tile_offsets(c, s, C, S, LAYOUT)
            out = elementwise(x_sample, dy_sample, offs, mask, a, b, hi, kx, k1, EPILOGUE, ACC, BACKWARD)
            tl.store(out_sample + offs, out.to(out_sample.dtype.element_ty), mask=mask)


@triton.jit
def grad_terms(x_sample, dy_sample, offs, mask, mean_hi_c, a_c, b_c, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """dz and dz*(x - mean_hi) of one tile (channel_grad_sums). Masked lanes give 0: dz is 0 there and
    x - mean_hi finite (or the channel's statistics, and so its sums, are not finite anyway)."""
    x = tl.load(x_sample + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(dy_sample + offs, mask=mask, other=0.0).to(ACC)
    xc = x - mean_hi_c[:, None]
    if ACTIVATION != 0:
        dz *= activation_grad(xc * a_c[:, None] + b_c[:, None], ACTIVATION)
    return dz, dz * xc


@triton.jit
def channel_grad_sums(
    x_sample, dy_sample, mean_hi_c, a_c, b_c, c, c_end, s_begin, s_end, C, S, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, ACTIVATION: tl.constexpr, LAYOUT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-channel sums over positions [s_begin, s_end) of dz and of dz*(x - mean_hi), [BLOCK_C] each
    (dz_sum, dz_xc_sum): dz is the gradient at the affine's output z, dy or dy*act'(z) with a fused
    activation (z = (x - mean_hi)*a_c + b_c recomputed, never stored)."""
    c_mask = c < c_end
    # Each lane sums its own elements; the lanes of a channel are summed once, after the loop.
    dz_acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    dz_xc_acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    s_full = s_begin + (s_end - s_begin) // BLOCK_S * BLOCK_S  # the end of the span's whole tiles
    row_mask = c_mask[:, None] & (tl.arange(0, BLOCK_S) >= 0)[None, :]
    for s0 in range(s_begin, s_full, BLOCK_S):  # whole tiles, then the span's last, partial one
        offs = tile_offsets(c, s0 + tl.arange(0, BLOCK_S), C, S, LAYOUT)
        dz, dz_xc = grad_terms(x_sample, dy_sample, offs, row_mask, mean_hi_c, a_c, b_c, ACTIVATION, ACC)
        dz_acc += dz
        dz_xc_acc += dz_xc
    if s_full < s_end:
        s = s_full + tl.arange(0, BLOCK_S)
        offs = tile_offsets(c, s, C, S, LAYOUT)
        mask = c_mask[:, None] & (s < s_end)[None, :]
        dz, dz_xc = grad_terms(x_sample, dy_sample, offs, mask, mean_hi_c, a_c, b_c, ACTIVATION, ACC)
        dz_acc += dz
        dz_xc_acc += dz_xc
    # The sums go through one op each (a no-op: masked channels sum to 0) before any use: triton 3.6's
    # OptimizeThreadLocality pass asserts that a reduced loop result has a single user, and the fused
    # backward both stores and weights them.
    return tl.where(c_mask, tl.sum(dz_acc, axis=1), 0.0), tl.where(c_mask, tl.sum(dz_xc_acc, axis=1), 0.0)


@triton.jit
def group_size(Cg, S, ACC: tl.constexpr):
    """Cg*S, the number of elements of a group, in ACC. Formed in int64: a group can hold 2^31
    elements or more (G = 1 on a tensor that large), where Cg*S in int32 wraps around."""
    return (tl.cast(Cg, tl.int64) * S).to(ACC)


@triton.jit
def dx_coefficients(dzw_sum, dzw_xc_sum, mean_lo, rstd, group_size):
    """Per-group coefficients of dx = a*dz + coef_x*(x - mean_hi) + coef_1 (the backward math is
    written out in gn_bwd.py's docstring): dzw_sum = sum(w*dz) and dzw_xc_sum = sum(w*dz*(x - mean_hi))
    over the group's group_size elements, w the effective weight."""
    mean_dzw = dzw_sum / group_size
    mean_dzw_xhat = rstd * (dzw_xc_sum - mean_lo * dzw_sum) / group_size
    coef_x = -rstd * rstd * mean_dzw_xhat
    coef_1 = -rstd * mean_dzw - coef_x * mean_lo
    return coef_x, coef_1


@triton.jit
def partial_stats(Partials, row, j, SPANS):
    """Pointers to the count, mean, M2 and reference of piece j of group row `row` (n*G + group, int64)
    in the forward's workspace Partials (N*G, SPANS, 4): mean and M2 of x - reference."""
    base = Partials + (row * SPANS + j) * 4
    return base, base + 1, base + 2, base + 3


@triton.jit
def group_partials(Partials, row, SPANS):
    """Where the pieces of group row(s) `row` start in the forward's workspace, for loops over the
    pieces (span_stats): the row's offset is then formed once, outside the loop."""
    return Partials + row * SPANS * 4


@triton.jit
def span_stats(spans, gid_mask, k0, SPANS, BLOCK_SPANS: tl.constexpr):
    """Pointers to the count, mean, M2 and reference of pieces k0 .. k0 + BLOCK_SPANS - 1 of the groups
    at `spans` (group_partials, [R, 1]), and the mask of those that exist: [R, BLOCK_SPANS] each."""
    k = k0 + tl.arange(0, BLOCK_SPANS)[None, :]
    k_mask = gid_mask[:, None] & (k < SPANS)
    base = spans + k * 4
    return base, base + 1, base + 2, base + 3, k_mask


@triton.jit
def group_reference(
    x_sample, pilot, c_begin, c_end, Cg, C, S, R: tl.constexpr, BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """A value inside each of the R groups' data that the statistics are taken relative to (passed to
    shifted_stats as its pilot): the pilot plus the mean of x - pilot over the group's first BLOCK_S
    positions of its first channel. The mean relative to it stays small, and so do the split path's
    partial means, which merge without the rounding of a large x - pilot (a first element far from
    the rest)."""
    first, channels = group_channels(c_begin, c_end, Cg, R)
    s = tl.arange(0, BLOCK_S)
    mask = (channels > 0)[:, None] & (s < S)[None, :]
    head = tl.load(x_sample + tile_offsets(first, s, C, S, LAYOUT), mask=mask, other=0.0).to(ACC)
    return pilot + tl.sum(tl.where(mask, head - pilot[:, None], 0.0), axis=1) / tl.minimum(S, BLOCK_S).to(ACC)


@triton.jit
def partial_sums(Partials, nc, j, SPANS):
    """Pointers to dz_sum and dz_xc_sum of span j of channel row(s) nc (n*C + c, int64) in the
    backward's workspace Partials (N, C, SPANS, 2)."""
    base = Partials + (nc * SPANS + j) * 2
    return base, base + 1


@triton.jit
def channel_partials(Partials, nc, SPANS):
    """Where the spans of channel row(s) nc = n*C + c start in the backward's workspace, for loops over
    the spans (span_sums): the row's offset is then formed once, outside the loop."""
    return Partials + nc * SPANS * 2


@triton.jit
def span_sums(spans, j):
    """Pointers to dz_sum and dz_xc_sum of span(s) j of the channel(s) at `spans` (channel_partials)."""
    base = spans + j * 2
    return base, base + 1


@triton.jit
def sum_spans(Partials, nc, mask, SPANS, ACC: tl.constexpr):
    """dz_sum and dz_xc_sum of channel row(s) nc = n*C + c totalled over all spans, in span order."""
    dz_sum = tl.zeros(mask.shape, ACC)
    dz_xc_sum = tl.zeros(mask.shape, ACC)
    spans = channel_partials(Partials, nc, SPANS)
    for j in range(0, SPANS):
        dz_ptr, dz_xc_ptr = span_sums(spans, j)
        dz_sum += tl.load(dz_ptr, mask=mask, other=0.0)
        dz_xc_sum += tl.load(dz_xc_ptr, mask=mask, other=0.0)
    return dz_sum, dz_xc_sum
