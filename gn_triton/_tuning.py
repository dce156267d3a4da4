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
import math
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import triton
import triton.testing

from . import _cost, _plan_cache
from ._checks import INTERPRET
from ._cost import DeviceModel
from ._plan import Plan, Problem


@functools.cache
def device_info(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes), read from the device the first time it is needed (on a ROCm build of torch:
    compute units, and the L2 of one XCD)."""
    if device.type != "cuda":
        return 4, 4 << 20  # the interpreter: a nominal small GPU
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def _tile(p: Problem, groups: int, elems: int, split: int, chunks: int = 1) -> tuple[int, int]:
    """(block_c, block_s) of about `elems` elements, long along the layout's contiguous axis, and
    short enough along positions that a block splits into `split` spans."""
    positions = triton.next_power_of_2(p.S)
    if split > 1:
        span = triton.cdiv(p.S, split)
        positions = min(positions, max(16, 1 << (span.bit_length() - 1)))
    return _least_masked_tile(p, Plan(split, groups, chunks=chunks), positions, elems)


# channels_last tile rows: a pixel's channels of the block, at most this many (the [R, BLOCK_C] membership
# masks and per-channel vectors grow with it; 256 bf16 channels are 512 contiguous bytes).
_MAX_CHANNELS_LAST_ROW = 256


def _least_masked_tile(p: Problem, plan: Plan, positions: int, elems: int) -> tuple[int, int]:
    """Of the tiles of 512 (or elems/2 if less) to elems elements, the one whose lanes hold data most often
    (Plan.valid_share: rows past a block's or chunk's channels and columns past a span's end are masked,
    yet issue their instructions), then the largest, then the one longest along the layout's contiguous
    axis: NCHW a channel's positions (rows of at least 16), channels_last a pixel's channels (rows that
    divide the block's channels, e.g. 16 of Cg = 40 x 2 groups; odd maps such as 7x7 mask only pixels
    past a span's end). When none is that large, the block in one tile. The plan's warps follow the tile
    (_make_plan). In channels_last, smaller tiles (one warp of 8 or 4 elements a thread) masked nothing on
    the short spans of batch-1 splits, yet their loops issued 2-4x the instructions per element."""
    if p.channels_last:  # the long axis is the block's channels
        channels = min(p.Cg * plan.groups_per_program, p.C)
        long_top, long_min, short_top = min(triton.next_power_of_2(channels), _MAX_CHANNELS_LAST_ROW), 1, positions
        as_tile = lambda long, short: (long, short)  # noqa: E731
    else:  # the long axis is the positions
        channels = plan.chunk(p)[0] if plan.chunks > 1 else min(p.Cg * plan.groups_per_program, p.C)
        long_top, long_min, short_top = positions, 16, triton.next_power_of_2(channels)
        as_tile = lambda long, short: (short, long)  # noqa: E731
    best, best_key = None, None
    long = min(long_top, elems)
    while long >= long_min:
        short = min(short_top, elems // long)
        while short >= 1 and long * short >= min(elems // 2, 512):
            block_c, block_s = as_tile(long, short)
            valid = dataclasses.replace(plan, block_c=block_c, block_s=block_s).valid_share(p)
            key = (round(valid * 20), long * short, long)  # valid share in steps of 5%
            if best_key is None or key > best_key:
                best, best_key = (block_c, block_s), key
            short //= 2
        long //= 2
    if best is None:
        long = min(long_top, elems)
        best = as_tile(long, min(short_top, max(1, elems // long)))
    return best


def _chunk_options(p: Problem, split: int, groups: int) -> list[tuple[int, int]]:
    """(spans, chunks) of a block's programs worth considering: the split itself, and on the NCHW split
    path with one group per program, the group's channels cut into chunks of 1, 2, 4, ... channels
    (each a power of two dividing Cg, so that tile rows divide it) over about split / chunks spans."""
    options = [(split, 1)]
    if split > 1 and groups == 1 and not p.channels_last:
        chunk_c = 1
        while chunk_c < p.Cg and p.Cg % chunk_c == 0:
            chunks = p.Cg // chunk_c
            options.append((max(2, triton.cdiv(split, chunks)), chunks))
            chunk_c *= 2
    return options


def _make_plan(p: Problem, split: int, groups: int, elems: int, num_warps: int, wave_blocks: int) -> Plan:
    best: Plan | None = None
    best_key = None
    for spans, chunks in _chunk_options(p, split, groups):
        block_c, block_s = _tile(p, groups, elems, spans, chunks)
        plan = Plan(spans, groups, block_c, block_s, num_warps, wave_blocks, chunks).fit(p)
        key = (round(plan.valid_share(p) * 20), block_c * block_s, -chunks)  # as _least_masked_tile, then fewer chunks
        if best_key is None or key > best_key:
            best, best_key = plan, key
    # A smaller tile (fewer masked lanes, a short span) keeps the elements per thread: fewer warps (a
    # loop over 8 elements a thread costs ~0.3 instructions per element more than one over 16).
    assert best is not None  # _chunk_options gives at least one option
    warps = max(1, min(num_warps, num_warps * best.block_c * best.block_s // elems))
    return dataclasses.replace(best, num_warps=warps)


def _block_bytes(direction: str, p: Problem, groups: int) -> int:
    """Bytes a block's programs read per pass."""
    return groups * p.row_elems * p.elem_size * _cost.tensors_read(direction)


def _wave_blocks(direction: str, p: Problem, groups: int, budget: int) -> int:
    """Blocks per wave so that a wave's bytes fit `budget` (0: the whole tensor already does)."""
    block_bytes = _block_bytes(direction, p, groups)
    if p.blocks(groups) * block_bytes <= budget:
        return 0
    return max(1, budget // block_bytes)


def _layout_groups(p: Problem) -> int:
    """Groups per program the layout wants. NCHW: one (a group is contiguous). channels_last: enough
    adjacent groups that each pixel's slice of the block is at least a 128-byte cache line, so that
    strided pixel reads waste no sectors, while blocks stay small enough to fill the GPU and to go
    in L2-sized waves."""
    if not p.channels_last:
        return 1
    groups = triton.next_power_of_2(triton.cdiv(128, p.Cg * p.elem_size))
    return min(groups, triton.next_power_of_2(p.G))


def _group_options(p: Problem) -> list[int]:
    """Groups per program worth considering. NCHW: one, or several tiny groups. channels_last: the
    layout's choice, smaller blocks down to a 32-byte sector per pixel (they fit L2 where a
    line-wide block does not), and all groups of a sample."""
    top = triton.next_power_of_2(p.G)
    if not p.channels_last:
        options, groups = [1], 2
        while groups <= top and groups * p.row_elems <= 8192:
            options.append(groups)
            groups *= 2
        return options
    options, groups = [], _layout_groups(p)
    sector = min(top, triton.next_power_of_2(triton.cdiv(_cost.SECTOR_BYTES, p.Cg * p.elem_size)))
    while groups >= sector:
        options.append(groups)
        groups //= 2
    return list(dict.fromkeys([*options, top]))


def _device(device: torch.device | DeviceModel) -> DeviceModel:
    """The cost model's view of a CUDA device (a DeviceModel passes through: explain plans for one)."""
    if isinstance(device, DeviceModel):
        return device
    sms, l2_bytes = device_info(device)
    return _cost.device_model(device, sms, l2_bytes)


_TILES = ((4096, 8), (2048, 4), (4096, 4), (8192, 8))  # (elements per tile, warps)


def _classic_plan(direction: str, p: Problem, dev: DeviceModel) -> Plan:
    """The rule of thumb the model's ranking starts from (it wins ties): fused when blocks fill the
    GPU twice over, with several tiny groups per program; else split in L2-sized waves over about
    four programs per SM."""
    elems = 4096 if p.elem_size <= 2 else 2048
    num_warps = 8 if elems >= 4096 else 4
    groups = _layout_groups(p)
    if p.blocks(groups) >= 2 * dev.sms:
        while (
            groups * 2 <= triton.next_power_of_2(p.G)
            and groups * 2 * p.row_elems <= elems
            and p.blocks(groups * 2) >= 4 * dev.sms
        ):
            groups *= 2
        return _make_plan(p, 1, groups, elems, num_warps, 0)
    wave = _wave_blocks(direction, p, groups, dev.l2_budget)
    return _make_plan(p, triton.cdiv(4 * dev.sms, wave or p.blocks(groups)), groups, elems, num_warps, wave)


def plan_space(direction: str, p: Problem, dev: DeviceModel) -> list[Plan]:
    """Every plan the model ranks: groups per program x tile and warps x fused or split (over 2-16
    programs per SM) x waves fitting the L2 budget, twice it, or none. The classic plan first."""
    plans = [_classic_plan(direction, p, dev)]
    for groups in _group_options(p):
        blocks = p.blocks(groups)
        waves = dict.fromkeys(_wave_blocks(direction, p, groups, b) for b in (dev.l2_budget, 2 * dev.l2_budget, 0))
        for elems, num_warps in _TILES:
            plans.append(_make_plan(p, 1, groups, elems, num_warps, 0))
            for wave in waves:
                for programs_per_sm in (4, 2, 8, 16):
                    split = triton.cdiv(programs_per_sm * dev.sms, wave or blocks)
                    if split > 1:
                        plans.append(_make_plan(p, split, groups, elems, num_warps, wave))
    return list(dict.fromkeys(_for_warp_size(plan, p, dev) for plan in plans))  # fit() folds equivalent plans


def _for_warp_size(plan: Plan, p: Problem, dev: DeviceModel) -> Plan:
    """The plan's warps made to fit the device's warp width. A 64-wide AMD wavefront holds two 32-wide
    warps: a program keeps its threads in half as many wavefronts, so each lane keeps the elements and
    the 128-bit loads of the 32-wide plan; a tile too small to give every lane of its wavefronts a
    128-bit load takes fewer of them (down to one), so a tile is a multiple of 64 lanes x elements per
    lane wherever it can be."""
    if dev.warp_size == 32:
        return plan
    num_warps = max(1, plan.num_warps * 32 // dev.warp_size)
    per_lane = p.vector  # elements of one 128-bit load
    while num_warps > 1 and plan.block_c * plan.block_s < dev.warp_size * num_warps * per_lane:
        num_warps //= 2
    return dataclasses.replace(plan, num_warps=num_warps)


@functools.lru_cache(maxsize=4096)
def ranked_plans(direction: str, p: Problem, dev: DeviceModel) -> tuple[tuple[Plan, _cost.Prediction], ...]:
    """The plan space, cheapest predicted first. Predictions within 0.5% of each other count as a tie,
    kept in plan_space's order (the model cannot tell them apart; the autotuner can)."""
    predicted = [(plan, _cost.predict(direction, p, plan, dev)) for plan in plan_space(direction, p, dev)]
    best = min(pred.time_us for _, pred in predicted)
    order = sorted(range(len(predicted)), key=lambda i: (round(math.log(predicted[i][1].time_us / best) / 0.005), i))
    return tuple(predicted[i] for i in order)


def heuristic_plan(direction: str, p: Problem, device: torch.device | DeviceModel) -> Plan:
    """A good plan without timing anything: the cost model's cheapest on a GPU (also under CUDA-graph
    capture and with GN_TRITON_AUTOTUNE=0); few large programs in the interpreter."""
    if isinstance(device, torch.device) and device.type != "cuda":
        # The interpreter costs per program and loop iteration: few programs, large tiles.
        elems = 16384
        groups = 1
        while groups * 2 <= triton.next_power_of_2(p.G) and groups * 2 * p.row_elems <= elems:
            groups *= 2
        return _make_plan(p, 1, max(groups, _layout_groups(p)), elems, 4, 0)
    return ranked_plans(direction, p, _device(device))[0][0]


def tune_candidates() -> int | None:
    """How many plans the autotuner times per key: GN_TRITON_TUNE_CANDIDATES (default 4; "all")."""
    value = os.environ.get("GN_TRITON_TUNE_CANDIDATES", "4")
    return None if value == "all" else max(1, int(value))


def candidate_plans(direction: str, p: Problem, device: torch.device | DeviceModel) -> list[Plan]:
    """Exactly the plans the autotuner times: the model's cheapest few, at most two of each kind
    (fused or split, waves or not, groups per program), so that where the model may be wrong about
    the kind the timing decides; the heuristic plan first."""
    limit = tune_candidates()
    chosen: list[Plan] = []
    per_kind: dict[tuple[bool, bool, int], int] = {}
    for plan, _ in ranked_plans(direction, p, _device(device)):
        kind = (plan.split == 1, plan.wave_blocks > 0, plan.groups_per_program)
        if limit is None or per_kind.get(kind, 0) < 2:
            chosen.append(plan)
            per_kind[kind] = per_kind.get(kind, 0) + 1
        if limit is not None and len(chosen) == limit:
            break
    return chosen


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
        p.out_dtype,  # fp32 output from 16-bit input (autocast) moves other bytes than 16-bit output
        needs,
    )


_tuned: dict[tuple, Plan] = {}
_override: dict | None = None
override_key: tuple | None = None  # _override as a key of the launch programs planned under it (gn_triton._launch)


@contextlib.contextmanager
def override_plan(**fields) -> Iterator[None]:
    """Force plan fields (e.g. split=3, block_s=8) for the calls inside the block: tests use it to
    run the fused and split paths, and tile loops, on tiny shapes."""
    global _override, override_key
    previous = _override, override_key
    _override, override_key = fields, tuple(sorted(fields.items()))
    try:
        yield
    finally:
        _override, override_key = previous


def autotune_enabled(device: torch.device) -> bool:
    """Tuned plans on a CUDA device, unless GN_TRITON_AUTOTUNE=0 (then the heuristic plan)."""
    return device.type == "cuda" and not INTERPRET and os.environ.get("GN_TRITON_AUTOTUNE", "1") != "0"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def provisional(device: torch.device) -> bool:
    """Whether a plan chosen now stands in for a tuned one still to come (under CUDA-graph capture,
    where nothing is timed): a launch program planned now is used, not kept."""
    return autotune_enabled(device) and _capturing()


def choose_plan(
    direction: str,
    p: Problem,
    device: torch.device,
    launch: Callable[[Plan], None],
    needs: tuple = (),
) -> Plan:
    """The plan for this call: forced, tuned, or heuristic. A tuned plan is timed once per key and
    kept in memory and on disk (gn_triton._plan_cache), so later processes reuse it; under CUDA-graph
    capture nothing is timed, but a tuned plan already known is used."""
    if _override is not None:
        return dataclasses.replace(heuristic_plan(direction, p, device), **_override).fit(p)
    if not autotune_enabled(device):
        return heuristic_plan(direction, p, device)
    key = _bucket_key(direction, p, device, needs)
    if key not in _tuned:
        entry = _plan_cache.entry_key(key[:1] + key[2:])  # the file is per device: no device index
        stored = _stored_plan(_plan_cache.load(device).get(entry))
        if stored is not None:
            _tuned[key] = stored
        elif _capturing():
            return heuristic_plan(direction, p, device)
        else:
            _tuned[key] = _fastest(candidate_plans(direction, p, device), launch)
            _plan_cache.store(device, entry, dataclasses.asdict(_tuned[key]))
    return _tuned[key].fit(p)


def _stored_plan(fields: dict | None) -> Plan | None:
    """A plan read back from the disk cache, or None if the entry is absent or not a valid plan."""
    names = {f.name for f in dataclasses.fields(Plan)}
    if not fields or set(fields) != names or not all(type(v) is int and v >= 0 for v in fields.values()):
        return None
    return Plan(**fields)


def _fastest(plans: list[Plan], launch: Callable[[Plan], None]) -> Plan:
    """The candidate that times fastest. One that fails to compile or run (a tile the GPU cannot hold,
    a compiler crash) is skipped with a warning, never the user's call, unless every one fails."""
    best, best_ms, failure = None, float("inf"), None
    for plan in plans:
        try:
            ms = triton.testing.do_bench(lambda plan=plan: launch(plan), warmup=5, rep=20)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate only removes it
            warnings.warn(f"gn_triton: skipping candidate {plan} ({type(exc).__name__}: {exc})"[:500], stacklevel=2)
            failure = exc
            continue
        if ms < best_ms:
            best, best_ms = plan, ms
    if best is None:
        raise RuntimeError("gn_triton: no candidate plan could run") from failure
    return best


def untimed_plan(direction: str, p: Problem, device: torch.device) -> Plan:
    """The plan of a pass run in parts (gn_triton.stats, gn_triton.distributed): forced or heuristic,
    never timed (a tuned plan times the whole call, which a part is not)."""
    if _override is not None:
        return dataclasses.replace(heuristic_plan(direction, p, device), **_override).fit(p)
    return heuristic_plan(direction, p, device).fit(p)
