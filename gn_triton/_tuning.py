"""How a GroupNorm problem is cut into programs: the heuristic plan, the autotuner and its cache.

The design (see README "How it works"): rows are the N*G groups. When rows fill the GPU and a row is
small enough that the rows of all resident programs stay in L2, one fused launch does a row per
program (or several tiny rows per program). Otherwise each row is split into spans over more
programs (batch 1 must not run on 32 programs), with a partial-statistics launch then an apply
launch; when the tensor is larger than L2 the rows go in waves whose bytes fit in L2, so that the
apply launch re-reads the wave from L2 instead of HBM.
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

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Plan:
    """split: programs per row (1 = fused path, one launch); groups_per_program: rows per program on
    the fused path; block_c x block_s: the tile; wave_rows: rows per wave of the split path (0: all)."""

    split: int = 1
    groups_per_program: int = 1
    block_c: int = 16
    block_s: int = 256
    num_warps: int = 4
    wave_rows: int = 0

    def span(self, S: int) -> tuple[int, int]:
        """(positions per span, number of spans): spans are whole tiles, none of them empty."""
        span = triton.cdiv(triton.cdiv(S, self.split), self.block_s) * self.block_s
        return span, triton.cdiv(S, span)

    def waves(self, rows: int) -> Iterator[tuple[int, int]]:
        step = self.wave_rows or rows
        for offset in range(0, rows, step):
            yield offset, min(step, rows - offset)

    def fit(self, p: Problem) -> Plan:
        """This plan made valid for `p` (plans are cached per bucket of similar problems)."""
        split = max(1, min(self.split, triton.cdiv(p.S, self.block_s), _MAX_GRID_Y))
        groups = 1 if split > 1 else max(1, min(self.groups_per_program, triton.next_power_of_2(p.G)))
        wave = self.wave_rows if 0 < self.wave_rows < p.rows else 0
        return dataclasses.replace(self, split=split, groups_per_program=groups, wave_rows=wave)


@functools.cache
def device_info(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes), read from the device the first time it is needed."""
    if device.type != "cuda":
        return 4, 4 << 20  # the interpreter: a nominal small GPU
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def _tile(p: Problem, groups: int, elems: int, split: int) -> tuple[int, int]:
    """(block_c, block_s) of about `elems` elements, long along the layout's contiguous axis, and
    short enough along positions that a row splits into `split` spans."""
    channels = triton.next_power_of_2(p.Cg * groups)
    positions = triton.next_power_of_2(p.S)
    if split > 1:
        span = triton.cdiv(p.S, split)
        positions = min(positions, max(16, 1 << (span.bit_length() - 1)))
    if p.channels_last:
        block_c = min(channels, elems)
        return block_c, min(positions, max(1, elems // block_c))
    block_s = min(positions, elems)
    return min(channels, max(1, elems // block_s)), block_s


def _make_plan(p: Problem, split: int, groups: int, elems: int, num_warps: int, wave_rows: int) -> Plan:
    block_c, block_s = _tile(p, groups, elems, split)
    return Plan(split, groups, block_c, block_s, num_warps, wave_rows).fit(p)


def _tensors_read(direction: str) -> int:
    return 1 if direction == "fwd" else 2  # forward reads x; backward reads x and dy


def _wave_rows(direction: str, p: Problem, l2_bytes: int) -> int:
    row_bytes = p.row_elems * p.elem_size * _tensors_read(direction)
    if p.rows * row_bytes <= l2_bytes // 2:
        return 0
    return max(1, (l2_bytes // 2) // row_bytes)


def heuristic_plan(direction: str, p: Problem, device: torch.device) -> Plan:
    """A good plan without timing anything (the interpreter, GN_TRITON_AUTOTUNE=0, graph capture)."""
    if device.type != "cuda":
        # The interpreter costs per program and loop iteration: few programs, large tiles.
        elems = 16384
        groups = 1
        while groups * 2 <= triton.next_power_of_2(p.G) and groups * 2 * p.row_elems <= elems:
            groups *= 2
        return _make_plan(p, 1, groups, elems, 4, 0)

    sms, l2_bytes = device_info(device)
    elems = 4096 if p.elem_size <= 2 else 2048
    row_bytes = p.row_elems * p.elem_size * _tensors_read(direction)
    if p.rows >= 2 * sms and row_bytes <= 128 << 10:
        groups = 1  # tiny rows: several per program, while programs still fill the GPU
        while (
            groups * 2 <= triton.next_power_of_2(p.G)
            and groups * 2 * p.row_elems <= elems
            and p.rows // (groups * 2) >= 4 * sms
        ):
            groups *= 2
        return _make_plan(p, 1, groups, elems, 8 if elems >= 4096 else 4, 0)
    wave = _wave_rows(direction, p, l2_bytes)
    split = triton.cdiv(4 * sms, wave or p.rows)
    return _make_plan(p, split, 1, elems, 8 if elems >= 4096 else 4, wave)


def candidate_plans(direction: str, p: Problem, device: torch.device) -> list[Plan]:
    """The autotuner's search space: tile size, warps, fused vs split and its split factor, waves."""
    sms, l2_bytes = device_info(device)
    plans = [heuristic_plan(direction, p, device)]
    wave = _wave_rows(direction, p, l2_bytes)
    for elems, num_warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
        if p.rows >= sms:
            plans.append(_make_plan(p, 1, 1, elems, num_warps, 0))
        for wave_rows in dict.fromkeys((wave, 0)):  # waves that fit L2, or all rows at once
            for programs_per_sm in (2, 4, 8, 16):
                split = triton.cdiv(programs_per_sm * sms, wave_rows or p.rows)
                if split > 1:
                    plans.append(_make_plan(p, split, 1, elems, num_warps, wave_rows))
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
