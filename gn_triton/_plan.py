"""The vocabulary of a call, shared by the planner (_tuning, _cost) and the launcher (_launch): what
is normalised (Problem), what follows the normalisation (Affine), and how the work is cut into
programs (Plan), with the launch meta-parameters and constexpr flags the kernels take."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from ._checks import check_activation
from .kernels import Epilogue, Layout

_MAX_GRID_Y = 65535
# Triton's cap on the elements of one block tensor (TRITON_MAX_TENSOR_NUMEL): the kernels hold
# [R, BLOCK_C] membership masks, [BLOCK_C, BLOCK_S] tiles and [R, BLOCK_SPANS <= 16] merges.
MAX_TENSOR_NUMEL = 1 << 20
_INT32_MAX = 2**31 - 1


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of group_norm's output for `x`: torch's suggestion from x's stride order, so
    channels_last (also a sliced channels_last view) stays channels_last, as with torch's kernel."""
    return suggest_memory_format(x)


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


@dataclass(frozen=True)
class Problem:
    """A GroupNorm call as the planner sees it: x viewed as (N, C, S) with G groups."""

    N: int
    C: int
    S: int
    G: int
    dtype: torch.dtype
    channels_last: bool
    has_weight: bool
    has_bias: bool
    has_scale: bool = False  # per-sample (N, C) scale and shift after the affine
    has_shift: bool = False
    activation: int = 0  # fused activation (kernels' ACTIVATION constexpr)
    out_dtype: torch.dtype | None = None  # y's (and dy's) dtype when not x's: fp32 of 16-bit x under CUDA autocast

    @property
    def Cg(self) -> int:  # noqa: N802 - the paper's name
        return self.C // self.G

    @property
    def rows(self) -> int:
        return self.N * self.G

    @property
    def row_elems(self) -> int:
        return self.Cg * self.S

    def blocks(self, groups: int) -> int:
        """Programs' blocks when each owns `groups` adjacent groups of one sample."""
        return self.N * triton.cdiv(self.G, groups)

    @property
    def vector(self) -> int:
        """x's elements in one 16-byte (128-bit) load."""
        return max(1, 16 // self.elem_size)

    def channel_multiple(self, groups: int) -> int:
        """channels_last: the channels of x's widest aligned load when a program owns `groups` adjacent
        groups, the largest power of two that divides the first channel of every block (a multiple of
        groups*Cg) and its end (that, or C), up to a 16-byte vector (1 where nothing is aligned)."""
        return min(groups * self.Cg & -(groups * self.Cg), self.C & -self.C, self.vector)

    @property
    def row_multiple(self) -> int:
        """NCHW rows of S positions that are not a multiple of 16: the largest power of two dividing S, up
        to a 16-byte vector, that every row starts on (1 where the runtime already sees S as a multiple
        of 16, and in channels_last)."""
        if self.channels_last or self.S % 16 == 0:
            return 1
        return min(self.S & -self.S, self.vector)

    @property
    def elem_size(self) -> int:
        return self.dtype.itemsize

    @property
    def out_elem_size(self) -> int:
        return (self.out_dtype or self.dtype).itemsize

    @classmethod
    def of(cls, x: torch.Tensor, num_groups: int, affine: Affine, out_dtype: torch.dtype | None = None) -> Problem:
        """The problem of group_norm(x, num_groups) followed by `affine`, its output in out_dtype."""
        return cls(N=x.shape[0], C=x.shape[1], S=math.prod(x.shape[2:]), G=num_groups, dtype=x.dtype,
                   channels_last=memory_format(x) != torch.contiguous_format, has_weight=affine.weight is not None,
                   has_bias=affine.bias is not None, has_scale=affine.scale is not None,
                   has_shift=affine.shift is not None, activation=check_activation(affine.activation),
                   out_dtype=None if out_dtype == x.dtype else out_dtype)  # fmt: skip

    def flags(self, groups: int) -> dict:
        """The constexprs of the normalising kernels with `groups` groups per program: what follows the
        normalisation, how x is addressed, the accumulator."""
        epilogue = Epilogue(HAS_WEIGHT=self.has_weight, HAS_BIAS=self.has_bias, HAS_SCALE=self.has_scale,
                            HAS_SHIFT=self.has_shift, ACTIVATION=self.activation)  # fmt: skip
        return dict(EPILOGUE=epilogue, **self.base_flags(groups))

    def base_flags(self, groups: int) -> dict:
        """The constexprs of the kernels that only read x (partial statistics)."""
        layout = Layout(CHANNELS_LAST=self.channels_last, INDEX_64=self.N * self.C * self.S > _INT32_MAX,
                        C_MULTIPLE=self.channel_multiple(groups) if self.channels_last else 1,
                        S_MULTIPLE=self.row_multiple)  # fmt: skip
        return dict(LAYOUT=layout, ACC=tl.float64 if self.dtype == torch.float64 else tl.float32)


@dataclass(frozen=True)
class Plan:
    """How a call is cut into programs. A program owns a block of `groups_per_program` groups of one
    sample; split: programs per block along positions (1 = fused path, one launch); block_c x block_s:
    the tile; wave_blocks: blocks per wave of the split path (0: all at once); chunks: the split path
    also cuts a group's channels into this many chunks (NCHW, one group per program), so that a group
    of 10 channels runs in 2-row tiles over long spans instead of 16-row tiles with 6 rows masked."""

    split: int = 1
    groups_per_program: int = 1
    block_c: int = 16
    block_s: int = 256
    num_warps: int = 4
    wave_blocks: int = 0
    chunks: int = 1

    def blocks(self, p: Problem) -> int:
        return p.blocks(self.groups_per_program)

    def meta(self) -> dict:
        """The launch meta-parameters: groups per program, the tile, warps."""
        return dict(R=self.groups_per_program, BLOCK_C=self.block_c, BLOCK_S=self.block_s, num_warps=self.num_warps)

    def span(self, S: int) -> tuple[int, int]:
        """(positions per span, number of spans): spans are whole tiles, none of them empty."""
        span = triton.cdiv(triton.cdiv(S, self.split), self.block_s) * self.block_s
        return span, triton.cdiv(S, span)

    def chunk(self, p: Problem) -> tuple[int, int]:
        """(channels per chunk, chunks per block): the channels of a block one program of the split path
        walks (the whole block when chunks is 1) and how many such programs a span has."""
        if self.chunks == 1:
            return self.groups_per_program * p.Cg, 1
        chunk_c = triton.cdiv(p.Cg, self.chunks)
        return chunk_c, triton.cdiv(p.Cg, chunk_c)

    def chunk_constexpr(self, p: Problem) -> int:
        """The split kernels' CHUNK_C: channels per chunk, 0 for one chunk (the whole block)."""
        chunk_c, chunks = self.chunk(p)
        return chunk_c if chunks > 1 else 0

    def valid_share(self, p: Problem) -> float:
        """The share of the lanes of the plan's tiles that hold data. A program walks its chunk of the
        block's channels in block_c rows and its span's positions in block_s columns; rows past the
        chunk's channels and columns past the span's end are masked, yet issue their instructions."""
        channels = min(self.groups_per_program * p.Cg, p.C)
        chunk_c, chunks = self.chunk(p)
        last = channels - (chunks - 1) * chunk_c
        rows = (chunks - 1) * triton.cdiv(chunk_c, self.block_c) * self.block_c
        rows += triton.cdiv(last, self.block_c) * self.block_c
        span, spans = self.span(p.S)
        columns = (spans - 1) * span + triton.cdiv(p.S - (spans - 1) * span, self.block_s) * self.block_s
        return channels * p.S / (rows * columns)

    def waves(self, p: Problem) -> Iterator[tuple[int, int]]:
        """(first block, block count) of each wave."""
        blocks = self.blocks(p)
        step = self.wave_blocks or blocks
        for offset in range(0, blocks, step):
            yield offset, min(step, blocks - offset)

    def fit(self, p: Problem) -> Plan:
        """This plan made valid for `p` (plans are cached per bucket of similar problems)."""
        split = max(1, min(self.split, triton.cdiv(p.S, self.block_s), _MAX_GRID_Y))
        groups = max(1, min(self.groups_per_program, triton.next_power_of_2(p.G)))
        block_c = min(self.block_c, MAX_TENSOR_NUMEL // 16)
        if groups * max(block_c, 16) > MAX_TENSOR_NUMEL:  # many tiny groups: fewer per program, narrower tiles
            groups = MAX_TENSOR_NUMEL // max(block_c, 16)
            block_c = min(block_c, triton.next_power_of_2(groups * p.Cg))
        block_s = min(self.block_s, MAX_TENSOR_NUMEL // block_c)
        chunks = 1
        if split > 1 and groups == 1 and not p.channels_last:  # chunks that all hold channels
            chunks = triton.cdiv(p.Cg, triton.cdiv(p.Cg, max(1, min(self.chunks, p.Cg, _MAX_GRID_Y))))
        fitted = dataclasses.replace(self, split=split, groups_per_program=groups, block_c=block_c, block_s=block_s,
                                     chunks=chunks)  # fmt: skip
        wave = self.wave_blocks if 0 < self.wave_blocks < fitted.blocks(p) else 0
        return dataclasses.replace(fitted, wave_blocks=wave)


def merge_step(spans: int) -> int:
    """Spans merged per step when a program reads its block's partials: few enough to keep the merge
    tile small in registers."""
    return min(triton.next_power_of_2(spans), 16)
