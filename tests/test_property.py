"""Property test: random shapes, groups, dtypes, layouts, offsets, affine options and plans, all
against the float64 reference. Derandomized (a fixed example sequence) so CI is repeatable.

The plans are the planner's own (cases.PLANS["heuristic"]) or random points of the plan space around
the named ones (the same fields, split being Plan.split as everywhere): random rather than named, so
that shapes meet tiles, group counts and waves that no hand-written case combines."""

import torch
from cases import DTYPES, LAYOUTS, PLANS
from gn_testing import assert_matches_reference, make_input, make_params
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gn_triton import _tuning

PLAN_SPACE = st.one_of(
    st.just(PLANS["heuristic"]),
    st.builds(dict, split=st.just(1), groups_per_program=st.sampled_from([1, 2, 4]),
              block_c=st.sampled_from([1, 2, 8]), block_s=st.sampled_from([1, 4, 16])),
    st.builds(dict, split=st.integers(2, 5), groups_per_program=st.sampled_from([1, 2, 4]),
              block_c=st.sampled_from([1, 4]), block_s=st.sampled_from([2, 8]), wave_blocks=st.integers(0, 3)),
)  # fmt: skip


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    N=st.integers(1, 3),
    G=st.integers(1, 4),
    Cg=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    offset=st.sampled_from([0.0, 50.0, -1e3]),
    weight=st.booleans(),
    bias=st.booleans(),
    plan=PLAN_SPACE,
)
def test_matches_reference(N, G, Cg, spatial, dtype, layout, offset, weight, bias, plan, device):
    shape = (N, G * Cg, *spatial)
    assume(N * Cg * torch.Size(spatial).numel() > 1)  # torch refuses one value per group (test_api)
    if layout == "channels_last" and len(shape) not in (4, 5):
        layout = "permuted"
    if layout == "sliced" and len(shape) == 2:
        layout = "contiguous"
    x = make_input(shape, dtype, device, offset=offset, scale=2.0, layout=layout)
    w, b = make_params(shape[1], dtype, device, weight=weight, bias=bias)
    with _tuning.override_plan(**plan):
        assert_matches_reference(x, G, w, b)
