"""How a GroupNorm problem is cut into programs: the heuristic plan, the autotuner and its cache.

The design (see README "How it works"): rows are the N*G groups; a program owns a block of groups of
one sample (one group for NCHW, several tiny ones, or all of them for channels_last so that tiles
read whole pixels). When blocks fill the GPU and are small enough that the blocks of all resident
programs stay in L2, one fused launch does a block per program. Otherwise each block is split into
spans over more programs (batch 1 must not run on 32 programs), with a partial-statistics launch
then an apply launch; when the tensor is larger than L2 the blocks go in waves whose bytes fit in
L2, so that the apply launch re-reads the wave from L2 instead of HBM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.testing

# Read once at import (no device is touched): Triton decides at decoration time whether the kernels
# are compiled or interpreted, so this cannot change later in the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MAX_GRID_Y = 65535


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
    def elem_size(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    """How a call is cut into programs. A program owns a block of `groups_per_program` groups of one
    sample; split: programs per block along positions (1 = fused path, one launch); block_c x block_s:
    the tile; wave_blocks: blocks per wave of the split path (0: all at once)."""

    split: int = 1
    groups_per_program: int = 1
    block_c: int = 16
    block_s: int = 256
    num_warps: int = 4
    wave_blocks: int = 0

    def blocks(self, p: Problem) -> int:
        return p.blocks(self.groups_per_program)

    def span(self, S: int) -> tuple[int, int]:
        """(positions per span, number of spans): spans are whole tiles, none of them empty."""
        span = triton.cdiv(triton.cdiv(S, self.split), self.block_s) * self.block_s
        return span, triton.cdiv(S, span)

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
        fitted = dataclasses.replace(self, split=split, groups_per_program=groups)
        wave = self.wave_blocks if 0 < self.wave_blocks < fitted.blocks(p) else 0
        return dataclasses.replace(fitted, wave_blocks=wave)


@functools.cache
def device_info(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes), read from the device the first time it is needed."""
    if device.type != "cuda":
        return 4, 4 << 20  # the interpreter: a nominal small GPU
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def _tile(p: Problem, groups: int, elems: int, split: int) -> tuple[int, int]:
    """(block_c, block_s) of about `elems` elements, long along the layout's contiguous axis, and
    short enough along positions that a block splits into `split` spans."""
    channels = min(p.Cg * groups, p.C)
    positions = triton.next_power_of_2(p.S)
    if split > 1:
        span = triton.cdiv(p.S, split)
        positions = min(positions, max(16, 1 << (span.bit_length() - 1)))
    if p.channels_last:
        # A pixel's channels of the block in one tile row when they fit in 128; otherwise channel
        # blocks that divide them (no padded lanes), at least 32 wide.
        block_c = triton.next_power_of_2(channels)
        if block_c > 128:
            divisor = channels & -channels
            block_c = min(128, divisor) if divisor >= 32 else 128
        return block_c, min(positions, max(1, elems // block_c))
    block_s = min(positions, elems)
    return min(triton.next_power_of_2(channels), max(1, elems // block_s)), block_s


def _make_plan(p: Problem, split: int, groups: int, elems: int, num_warps: int, wave_blocks: int) -> Plan:
    block_c, block_s = _tile(p, groups, elems, split)
    return Plan(split, groups, block_c, block_s, num_warps, wave_blocks).fit(p)


def _tensors_read(direction: str) -> int:
    return 1 if direction == "fwd" else 2  # forward reads x; backward reads x and dy


def _block_bytes(direction: str, p: Problem, groups: int) -> int:
    """Bytes a block's programs read per pass."""
    return groups * p.row_elems * p.elem_size * _tensors_read(direction)


def _wave_blocks(direction: str, p: Problem, groups: int, l2_bytes: int) -> int:
    """Blocks per wave so that a wave's bytes fit in half the L2 (0: the whole tensor already does)."""
    block_bytes = _block_bytes(direction, p, groups)
    if p.blocks(groups) * block_bytes <= l2_bytes // 2:
        return 0
    return max(1, (l2_bytes // 2) // block_bytes)


def _layout_groups(p: Problem) -> int:
    """Groups per program the layout wants. NCHW: one (a group is contiguous). channels_last: enough
    adjacent groups that each pixel's slice of the block is at least a 128-byte cache line, so that
    strided pixel reads waste no sectors, while blocks stay small enough to fill the GPU and to go
    in L2-sized waves."""
    if not p.channels_last:
        return 1
    groups = triton.next_power_of_2(triton.cdiv(128, p.Cg * p.elem_size))
    return min(groups, triton.next_power_of_2(p.G))


def heuristic_plan(direction: str, p: Problem, device: torch.device) -> Plan:
    """A good plan without timing anything (the interpreter, GN_TRITON_AUTOTUNE=0, graph capture)."""
    if device.type != "cuda":
        # The interpreter costs per program and loop iteration: few programs, large tiles.
        elems = 16384
        groups = 1
        while groups * 2 <= triton.next_power_of_2(p.G) and groups * 2 * p.row_elems <= elems:
            groups *= 2
        return _make_plan(p, 1, max(groups, _layout_groups(p)), elems, 4, 0)

    sms, l2_bytes = device_info(device)
    elems = 4096 if p.elem_size <= 2 else 2048
    num_warps = 8 if elems >= 4096 else 4
    groups = _layout_groups(p)
    blocks = p.blocks(groups)
    if blocks >= 2 * sms and _block_bytes(direction, p, groups) <= 128 << 10:
        while (  # tiny groups: several per program, while programs still fill the GPU
            groups * 2 <= triton.next_power_of_2(p.G)
            and groups * 2 * p.row_elems <= elems
            and p.blocks(groups * 2) >= 4 * sms
        ):
            groups *= 2
        return _make_plan(p, 1, groups, elems, num_warps, 0)
    wave = _wave_blocks(direction, p, groups, l2_bytes)
    split = triton.cdiv(4 * sms, wave or blocks)
    return _make_plan(p, split, groups, elems, num_warps, wave)


def candidate_plans(direction: str, p: Problem, device: torch.device) -> list[Plan]:
    """The autotuner's search space: groups per program, tile size, warps, fused vs split and its
    split factor, waves."""
    sms, l2_bytes = device_info(device)
    plans = [heuristic_plan(direction, p, device)]
    for groups in dict.fromkeys((_layout_groups(p), 1, triton.next_power_of_2(p.G) if p.channels_last else 1)):
        blocks = p.blocks(groups)
        wave = _wave_blocks(direction, p, groups, l2_bytes)
        for elems, num_warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
            if blocks >= sms:
                plans.append(_make_plan(p, 1, groups, elems, num_warps, 0))
            for wave_blocks in dict.fromkeys((wave, 0)):  # waves that fit L2, or all blocks at once
                for programs_per_sm in (2, 4, 8, 16):
                    split = triton.cdiv(programs_per_sm * sms, wave_blocks or blocks)
                    if split > 1:
                        plans.append(_make_plan(p, split, groups, elems, num_warps, wave_blocks))
    return list(dict.fromkeys(plans))  # fit() folds equivalent plans together


def _bucket_key(direction: str, p: Problem, device: torch.device, needs: tuple) -> tuple:
    """Problems that share a key share a tuned plan: row count is bucketed to a power of two, so a
    new batch size reuses the plan of its bucket."""
    return (
        direction,
        str(device),
        triton.next_power_of_2(p.rows),
        p.G,
        p.Cg,
        triton.next_power_of_2(p.S),
        p.dtype,
        p.channels_last,
        p.has_weight,
        p.has_bias,
        p.has_scale,
        p.has_shift,
        p.activation,
        needs,
    )


_tuned: dict[tuple, Plan] = {}
_override: dict | None = None


@contextlib.contextmanager
def override_plan(**fields) -> Iterator[None]:
    """Force plan fields (e.g. split=3, block_s=8) for the calls inside the block: tests use it to
    run the fused and split paths, and tile loops, on tiny shapes."""
    global _override
    previous, _override = _override, fields
    try:
        yield
    finally:
        _override = previous


def autotune_enabled(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and not INTERPRET
        and os.environ.get("GN_TRITON_AUTOTUNE", "1") != "0"
        and not torch.cuda.is_current_stream_capturing()
    )


def choose_plan(
    direction: str,
    p: Problem,
    device: torch.device,
    launch: Callable[[Plan], None],
    needs: tuple = (),
) -> Plan:
    """The plan for this call: forced, tuned (timing each candidate once per key), or heuristic."""
    if _override is not None:
        return dataclasses.replace(heuristic_plan(direction, p, device), **_override).fit(p)
    if not autotune_enabled(device):
        return heuristic_plan(direction, p, device)
    key = _bucket_key(direction, p, device, needs)
    if key not in _tuned:
        _tuned[key] = _fastest(candidate_plans(direction, p, device), launch)
    return _tuned[key].fit(p)


def _fastest(plans: list[Plan], launch: Callable[[Plan], None]) -> Plan:
    best, best_ms = plans[0], float("inf")
    for plan in plans:
        try:
            ms = triton.testing.do_bench(lambda plan=plan: launch(plan), warmup=5, rep=20)
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
            continue  # a tile this GPU cannot hold: not a candidate here
        if ms < best_ms:
            best, best_ms = plan, ms
    return best
