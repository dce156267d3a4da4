"""channels_last and channels_last_3d plans: tile rows that divide a block's channels, the channel alignment
the kernels promise the compiler (Layout.C_MULTIPLE), and the numerics of those tiles against float64.

In channels_last a program's block of R groups is R*Cg contiguous channels at every pixel. The planner cuts
them into tile rows of a power of two that divides them (16 of Cg = 40 x 2 groups), and the kernels tell
the compiler that every block starts on a multiple of C_MULTIPLE channels, so that loads along channels are
128-bit even where Cg (40, 10, 20) is not a multiple of 16. That promise is not checked by the interpreter
(tl.multiple_of is a no-op there) and a false one would be a misaligned load on a GPU: the host test below
checks it for every block of every plan. NCHW rows of S positions, S not a multiple of 16 (14x14), carry the
same kind of promise (Layout.S_MULTIPLE) and are tested at the end."""

import random

import pytest
import torch
from gn_testing import assert_matches_reference, forward_backward, make_input, make_params
from test_numerics import assert_fp32_level

import gn_triton
from gn_triton import _cost, _tuning
from gn_triton._launches import plan_launches
from gn_triton._plan import Plan, Problem
from perf.suites import BATCHES, SUITES

H100 = _cost.known_device("h100")


def block_channels(p: Problem, plan: Plan) -> list[tuple[int, int]]:
    """(first channel, end channel) of every block of one sample, as kernels/_tile.py group_block forms them."""
    R = plan.groups_per_program
    return [(first * p.Cg, min((first + R) * p.Cg, p.C)) for first in range(0, p.G, R)]


def test_channel_multiple_divides_every_block_and_tile_row():
    """For random channels_last problems and plans (heuristic, and forced ones fitted as a call fits them):
    the C_MULTIPLE every launch passes divides every block's first and end channel, and is at most a 16-byte
    vector. (A tile row starts at first + k*BLOCK_C: the compiler takes the smaller of the two alignments,
    so rows narrower than C_MULTIPLE load BLOCK_C channels at a time; sm_90 SASS shows it, triton 3.6-3.9.)"""
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        G = rng.choice([1, 2, 3, 4, 5, 8, 16, 32])
        Cg = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 40, 64, 80])
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64])
        p = Problem(rng.choice([1, 2, 5]), G * Cg, rng.choice([1, 7, 49, 196, 1024]), G, dtype, True, True, True)
        forced = Plan(rng.choice([1, 3]), rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 8, 16, 64]), 32, 4).fit(p)
        for plan in (_tuning.heuristic_plan("fwd", p, H100), _tuning.heuristic_plan("bwd", p, H100), forced):
            plan = plan.fit(p)
            for direction in ("fwd", "bwd"):
                for launch in plan_launches(direction, p, plan):
                    if "LAYOUT" not in launch.constexprs:
                        continue
                    multiple = launch.constexprs["LAYOUT"].C_MULTIPLE
                    assert 1 <= multiple * p.elem_size <= 16 or multiple == 1, (p, plan, multiple)
                    for c_begin, c_end in block_channels(p, plan):
                        assert c_begin % multiple == 0 and c_end % multiple == 0, (p, plan, multiple)
                    checked += 1
    assert checked > 1000


def suite_channels_last_problems(dtype):
    for shapes in SUITES.values():
        for shape in shapes:
            if len(shape.spatial) in (2, 3):  # the shapes that have a channels_last (3d) memory format
                for N in BATCHES:
                    S = int(torch.Size(shape.spatial).numel())
                    yield Problem(N, shape.C, S, shape.G, dtype, True, True, True)


@pytest.mark.parametrize("dtype,valid", [(torch.bfloat16, 0.8), (torch.float32, 0.6)], ids=str)
def test_channels_last_tiles_are_full_vectors_with_few_masked_lanes(dtype, valid):
    """Every heuristic channels_last plan of the suites (4-D and 5-D shapes, batch 1-64, an H100's): tile rows
    of at least one 16-byte vector wherever a block's channels allow it (a group of 40 bf16 channels: rows of
    8, 16, ...; no 64-row tile with 24 rows masked), at least `valid` of the tiles' lanes hold data, and at
    least a 16-byte vector's elements a thread. 7x7 maps mask 12.5% of their positions; a batch-1 split of
    1xC640 32x32 (80 channels a block over 16-pixel spans) 17%; in fp32 1xC1280 16x16 at batch 1 37.5%:
    a tile of 512 elements over 16-pixel spans has rows of 32, and a smaller one costs more per element
    in loop overhead than its masked lanes (perf/results/static/)."""
    for p in suite_channels_last_problems(dtype):
        for direction in ("fwd", "bwd"):
            plan = _tuning.heuristic_plan(direction, p, H100).fit(p)
            multiple = p.channel_multiple(plan.groups_per_program)
            assert plan.block_c >= multiple, (direction, p, plan)
            assert plan.valid_share(p) >= valid, (direction, p, plan, plan.valid_share(p))
            assert plan.block_c * plan.block_s >= 32 * plan.num_warps * 16 // p.elem_size, (direction, p, plan)


# Problems whose channels_last blocks are not a power of two of channels, run in the interpreter on the
# planner's own plan and on forced fused and split plans with rows dividing the block's channels: Cg = 10
# (a group's 10 channels in rows of 2, two groups' 20 in rows of 4), Cg = 12 on a 7x7 map, and a 5-D
# channels_last_3d input with Cg = 8 (one 16-byte bf16 vector a row).
LAYOUT_CASES = {
    "4-D, Cg=10": ((2, 20, 5, 7), 2),
    "4-D, Cg=12, odd map": ((1, 36, 7, 7), 3),
    "5-D channels_last_3d, Cg=8": ((2, 16, 3, 4, 5), 2),
}
PLANS = {
    "heuristic": None,
    "fused, 2 groups, rows of 4": dict(split=1, groups_per_program=2, block_c=4, block_s=8, wave_blocks=0),
    "split 3, 1 group, rows of 2": dict(split=3, groups_per_program=1, block_c=2, block_s=8, wave_blocks=0),
}


def run_forced(plan, fn, *args, **kwargs):
    """fn(*args, **kwargs) under the named plan of PLANS."""
    if PLANS[plan] is None:
        return fn(*args, **kwargs)
    with _tuning.override_plan(**PLANS[plan]):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_gradients(dtype, case, plan, device):
    """Forward and every gradient, mean-shifted input, a fused SiLU with scale and shift, against float64."""
    size, groups = LAYOUT_CASES[case]
    x = make_input(size, dtype, device, offset=3.0, scale=2.0, layout="channels_last")
    w, b = make_params(size[1], dtype, device)
    y, *_ = run_forced(plan, assert_matches_reference, x, groups, w, b, activation="silu")
    fmt = torch.channels_last if len(size) == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("plan", ["fused, 2 groups, rows of 4", "split 3, 1 group, rows of 2"])
def test_offset_outlier_and_ramp_at_fp32_level(plan):
    """Data offset by 1e4 with a first element 1e3 away from its group, and a ramp along positions: fp32
    relative error <= 1e-6 against float64 (test_numerics.assert_fp32_level), channels_last."""
    x = make_input((2, 20, 9, 9), torch.float64, offset=1e4)
    x[:, 0, 0, 0] += 1e3
    x = x.contiguous(memory_format=torch.channels_last)
    assert_fp32_level(x.float(), 2, PLANS[plan], hard_for_torch=False)
    ramp = torch.linspace(-1.0, 1.0, 81, dtype=torch.float64).reshape(1, 1, 9, 9).expand(2, 20, 9, 9)
    x = (ramp + 1e-3 * torch.randn(2, 20, 9, 9, dtype=torch.float64)).contiguous(memory_format=torch.channels_last)
    assert_fp32_level(x.float(), 2, PLANS[plan], hard_for_torch=False)


@pytest.mark.parametrize("plan", ["fused, 2 groups, rows of 4", "split 3, 1 group, rows of 2"])
def test_nan_stays_in_its_group_and_runs_repeat_bit_for_bit(plan, device):
    """A NaN in group 1 of sample 1 makes that group's y and dx NaN and no other (the reference comparison
    checks every other value); two runs agree bit for bit."""
    x = make_input((2, 20, 5, 5), torch.float32, device, offset=1.0, layout="channels_last")
    x[1, 12, 2, 3] = float("nan")
    w, b = make_params(20, torch.float32, device)
    y, dx, *_ = run_forced(plan, assert_matches_reference, x, 2, w, b)
    assert torch.isnan(y[1, 10:]).all() and torch.isnan(dx[1, 10:]).all()
    assert not torch.isnan(y[0]).any() and not torch.isnan(y[1, :10]).any()
    x[1, 12, 2, 3] = 0.5
    dy = torch.randn_like(x)
    first, second = (run_forced(plan, forward_backward, gn_triton.group_norm, x, 2, w, b, dy) for _ in "ab")
    for a, c in zip(first[:4], second[:4]):
        assert torch.equal(a, c)


def test_row_multiple_divides_every_nchw_row():
    """NCHW rows of S positions, S not a multiple of 16 (14x14: 196): every row starts at c*S, so on the
    S_MULTIPLE each launch promises (Layout.S_MULTIPLE, tl.multiple_of in kernels/_tile.py tile_offsets),
    at most a 16-byte vector; 1 where the runtime already sees S as a multiple of 16 and in channels_last."""
    expected = {
        (196, torch.bfloat16): 4,
        (196, torch.float32): 4,
        (49, torch.bfloat16): 1,
        (100, torch.float16): 4,
        (24, torch.float64): 2,
        (1000, torch.bfloat16): 8,
        (4096, torch.bfloat16): 1,
        (7, torch.float32): 1,
    }
    for (S, dtype), multiple in expected.items():
        for channels_last in (False, True):
            p = Problem(2, 64, S, 32, dtype, channels_last, True, True)
            for direction in ("fwd", "bwd"):
                for launch in plan_launches(direction, p, _tuning.heuristic_plan(direction, p, H100)):
                    if "LAYOUT" in launch.constexprs:
                        got = launch.constexprs["LAYOUT"].S_MULTIPLE
                        assert got == (1 if channels_last else multiple) and S % got == 0, (p, got)


@pytest.mark.parametrize("plan", ["heuristic", "split 3, 1 group, rows of 2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_maps_in_nchw(dtype, plan, device):
    """NCHW 14x14 and 7x7 maps (rows starting on 4 and on 1 element): forward and every gradient against
    float64, mean-shifted, with a fused SiLU."""
    for size, groups in (((2, 8, 14, 14), 2), ((1, 12, 7, 7), 3)):
        x = make_input(size, dtype, device, offset=3.0, scale=2.0)
        w, b = make_params(size[1], dtype, device)
        run_forced(plan, assert_matches_reference, x, groups, w, b, activation="silu")
