"""The named cases that the tests of results draw from (test_correctness, test_numerics,
test_epilogues, test_property) and perf/sanitize_case.py: shapes, dtypes, layouts, epilogues and
forced plans. Plain data: no pytest, no gn_triton, so scripts outside pytest (perf/sanitize_case.py,
the benchmark job's correctness stage) can import it.

A plan is a set of gn_triton._tuning.override_plan fields, and `split` always means Plan.split: the
programs that share one block of groups along positions (1: the fused path, one launch; more: the
split path, partial statistics then an apply launch, all blocks at once or in waves). Each plan gives
every field that decides its path, so that it means the same under the interpreter's heuristic
(which packs all groups of a sample into one program) as under a GPU's. Plan.fit clamps split to the
tiles of a row: a split plan splits only rows longer than its block_s, so each test picks the plans
whose tiles fit its rows (small tiles for the matrix, large tiles for rows of thousands).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Shape(NamedTuple):
    size: tuple[int, ...]
    groups: int


# The named edge cases: each runs in every dtype and on every forced path (test_correctness).
SHAPES = {
    "nchw": Shape((2, 8, 5, 7), 4),
    "G=1 (LayerNorm)": Shape((2, 6, 3, 5), 1),
    "G=C (InstanceNorm)": Shape((2, 6, 3, 5), 6),
    "prime sizes": Shape((3, 7, 11, 13), 7),
    "C/G=3 not a power of two": Shape((2, 12, 4, 5), 4),
    "(N, C)": Shape((5, 12), 4),
    "3-D (N, C, L)": Shape((2, 6, 17), 3),
    "5-D (N, C, D, H, W)": Shape((2, 4, 3, 4, 5), 2),
    "N=1": Shape((1, 8, 9, 9), 4),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIXTEEN_BIT = [torch.float16, torch.bfloat16]

# gn_testing.make_input's memory layouts (channels_last only for 4-D and 5-D input).
LAYOUTS = ["contiguous", "sliced", "channels_last", "permuted"]
# gn_testing.laid_out's views of weight, bias (C,) and scale, shift (N, C), besides contiguous ones.
PARAM_LAYOUTS = ["strided", "stride 0", "transposed", "chunk"]

# Many tiny groups, G = C >= 2048: the plan must keep each block tensor ([R, BLOCK_C] above all)
# within Triton's 2^20 elements. Run on the planner's own plan only (thousands of groups).
MANY_GROUPS = {
    "G=C=2048": Shape((1, 2048, 2), 2048),
    "G=C=2048, channels_last": Shape((1, 2048, 1, 2), 2048),
}

ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
# Which of the per-sample (N, C) scale and shift are given: gn_testing.make_modulation's arguments.
MODULATIONS = {"scale+shift": dict(scale=True, shift=True), "scale": dict(shift=False), "shift": dict(scale=False)}
# Which of weight and bias are given: gn_testing.make_params's arguments.
AFFINE = {"weight+bias": {}, "bias only": dict(weight=False), "weight only": dict(bias=False),
          "neither": dict(weight=False, bias=False)}  # fmt: skip

PLANS = {
    "heuristic": {},  # the planner's own choice (in the interpreter: fused, one tile per block)
    # Small tiles for rows of a few dozen positions: the channel and position loops and their
    # masked tails run; 4 groups per program also masks the groups past G in a sample's last block.
    "fused, small tiles": dict(split=1, groups_per_program=1, block_c=2, block_s=8),
    "fused, 4 groups per program": dict(split=1, groups_per_program=4, block_c=4, block_s=8),
    "split 3, small tiles": dict(split=3, groups_per_program=1, block_c=2, block_s=8, wave_blocks=0),
    "split 2, waves of 3 blocks": dict(split=2, groups_per_program=2, block_c=4, block_s=8, wave_blocks=3),
    "split 3, 4 groups per program": dict(split=3, groups_per_program=4, block_c=4, block_s=4, wave_blocks=0),
    # A group's channels cut into 2 chunks (NCHW; channels_last runs it unchunked): C/G = 3 gives chunks
    # of 2 and 1 channels, C/G = 6 chunks of 3 in 2-row tiles (a masked row each).
    "split 3, 2 channel chunks": dict(split=3, groups_per_program=1, block_c=2, block_s=8, wave_blocks=0, chunks=2),
    # Large tiles for rows of hundreds to thousands of positions (the numerics tests).
    "fused, large tiles": dict(split=1, groups_per_program=4, block_c=8, block_s=1024),
    "split 4, large tiles": dict(split=4, groups_per_program=4, block_c=8, block_s=64, wave_blocks=0),
}

# Every path forced, on small tiles: the matrix's paths and the sanitizer's.
PATHS = [
    "fused, small tiles",
    "fused, 4 groups per program",
    "split 3, small tiles",
    "split 2, waves of 3 blocks",
    "split 3, 4 groups per program",
    "split 3, 2 channel chunks",
]
# One fused and one split plan, for tests that run both paths on short rows and on long ones.
FUSED_AND_SPLIT = ["fused, 4 groups per program", "split 3, 4 groups per program"]
FUSED_AND_SPLIT_LONG_ROWS = ["fused, large tiles", "split 4, large tiles"]
