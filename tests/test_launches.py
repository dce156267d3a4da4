"""What reaches the kernels, against expectations written out by hand: for every forced plan of the
suite on one shape, forward and backward, with and without scale/shift and for each set of gradients
asked for, the kernels launched, in order, on which grids, with the plan's tile and the chunk and
gradient flags (the correctness tests show those launches compute the right results); and the cost
model's launch count is the number of launches a call makes."""

import pytest
import torch
from cases import PLANS
from gn_testing import forced, make_input, make_modulation, make_params, recording

import gn_triton
from gn_triton import _cost

# The shape every case runs: N = 2, C = 8, G = 4 (Cg = 2), S = 5*7 = 35.
SIZE, GROUPS = (2, 8, 5, 7), 4

# Each forced plan's grids on that shape, worked out by hand from the plan's fields. Fused: one program
# per block of R groups of a sample, N*ceil(G/R) blocks. Split: (blocks of the wave, spans, chunks),
# spans = ceil(S/span) with span = ceil(ceil(S/split)/block_s)*block_s; a group's Cg = 2 channels in
# chunks of 1 where the plan asks for 2 chunks.
EXPECTED_GRIDS = {
    "fused, small tiles": ("fused", [(8,)]),  # R = 1: 2*4 blocks
    "fused, 4 groups per program": ("fused", [(2,)]),  # R = 4: 2*1 blocks
    "split 3, small tiles": ("split", [(8, 3, 1)]),  # span = ceil(12/8)*8 = 16: 3 spans
    "split 2, waves of 3 blocks": ("split", [(3, 2, 1), (1, 2, 1)]),  # R = 2: 4 blocks in waves of 3 and 1
    "split 3, 4 groups per program": ("split", [(2, 3, 1)]),  # span = ceil(12/4)*4 = 12: 3 spans
    "split 3, 2 channel chunks": ("split", [(8, 3, 2)]),
}
CHUNK_C = {"split 3, 2 channel chunks": 1}  # channels per chunk; 0 = the whole block


def expected_launches(plan: str, needs: dict) -> list[tuple[str, tuple]]:
    """The (kernel, grid) sequence of a forward then a backward asking for `needs`."""
    path, grids = EXPECTED_GRIDS[plan]
    if path == "fused":
        out = [("_gn_fwd_fused_kernel", grids[0]), ("_gn_bwd_fused_kernel", grids[0])]
    else:
        out = [
            launch
            for grid in grids
            for launch in (("_gn_fwd_partial_stats_kernel", grid), ("_gn_fwd_split_apply_kernel", grid))
        ]
        for grid in grids:
            out += [("_gn_bwd_partial_sums_kernel", grid)] + [("_gn_bwd_split_dx_kernel", grid)] * needs["x"]
    if needs["w"] or needs["b"]:
        out.append(("_gn_bwd_dparams_kernel", (1,)))  # C = 8 channels in one block of 8
    if needs["scale"] or needs["shift"]:
        out.append(("_gn_bwd_dscale_shift_kernel", (2, 1)))  # one program per sample
    return out  # fmt: skip


@pytest.mark.parametrize("plan", list(EXPECTED_GRIDS))
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("wanted", ["all", "x only", "parameters only"])
def test_launches_are_the_plans(monkeypatch, device, plan, modulated, wanted):
    x = make_input(SIZE, device=device, offset=2.0)
    w, b = make_params(8, device=device)
    scale, shift = make_modulation(2, 8, device=device) if modulated else (None, None)
    leaves = dict(x=x, w=w, b=b, scale=scale, shift=shift)
    grad = {"all": set(leaves), "x only": {"x"}, "parameters only": {"w", "b", "scale", "shift"}}[wanted]
    leaves = {k: v.clone().requires_grad_(k in grad) if v is not None else None for k, v in leaves.items()}
    needs = {k: v is not None and v.requires_grad for k, v in leaves.items()}
    with recording(monkeypatch) as launches, forced(plan):
        y = gn_triton.group_norm(leaves["x"], GROUPS, leaves["w"], leaves["b"], scale=leaves["scale"],
                                 shift=leaves["shift"], activation="silu")  # fmt: skip
        y.backward(torch.randn_like(y))
    assert [(name, grid) for name, grid, _ in launches] == expected_launches(plan, needs)
    fields = PLANS[plan]
    for name, _, kwargs in launches:
        if name in ("_gn_bwd_dparams_kernel", "_gn_bwd_dscale_shift_kernel"):
            continue  # small reductions with tiles of their own
        assert (kwargs["R"], kwargs["BLOCK_C"], kwargs["BLOCK_S"]) == (
            fields["groups_per_program"], fields["block_c"], fields["block_s"]), name  # fmt: skip
        epilogue = kwargs["EPILOGUE"] if "EPILOGUE" in kwargs else None
        if epilogue is not None:
            assert (epilogue.HAS_SCALE, epilogue.HAS_SHIFT, epilogue.ACTIVATION) == (modulated, modulated, 1), name
        if "split" in name or "partial" in name:
            assert kwargs["CHUNK_C"] == CHUNK_C.get(plan, 0), name
        if name == "_gn_bwd_fused_kernel":
            assert kwargs["NEEDS_DX"] == needs["x"], name


@pytest.mark.parametrize("plan", list(EXPECTED_GRIDS))
@pytest.mark.parametrize("modulated", [False, True])
def test_the_cost_model_counts_a_calls_launches(monkeypatch, device, plan, modulated):
    """The model's launch count is what a training call (every gradient) launches."""
    x = make_input(SIZE, device=device).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, device=device))
    scale, shift = (t.requires_grad_() for t in make_modulation(2, 8, device=device)) if modulated else (None, None)
    with forced(plan):
        from gn_triton._plan import Affine, Problem

        problem = Problem.of(x, GROUPS, Affine(w, b, scale, shift, None))
        with recording(monkeypatch) as launches:
            y = gn_triton.group_norm(x, GROUPS, w, b, scale=scale, shift=shift)
        forward = len(launches)
        with recording(monkeypatch) as launches:
            y.backward(torch.randn_like(y))
        backward = len(launches)
        plan_used = _launch_plan(x, problem)
    h100 = _cost.DEVICES["h100"]
    assert _cost.predict("fwd", problem, plan_used, h100).launches == forward
    assert _cost.predict("bwd", problem, plan_used, h100).launches == backward


def _launch_plan(x, problem):
    """The plan the forced override gives this problem (what the call above ran)."""
    from gn_triton import _tuning

    return _tuning.choose_plan("fwd", problem, x.device, lambda plan: None)


def test_channel_chunks_are_the_split_grids_third_axis():
    """A split plan with a group's channels in chunks runs (blocks, spans, chunks) programs, each with
    the chunk's channels as CHUNK_C; the cost model counts them; channels_last and the fused path have
    one chunk (CHUNK_C = 0, the whole block)."""
    import dataclasses

    from gn_triton._launches import plan_launches
    from gn_triton._tuning import Plan, Problem

    p = Problem(1, 320, 4096, 32, torch.bfloat16, False, True, True)
    plan = Plan(split=4, block_c=2, block_s=1024, num_warps=4, chunks=5).fit(p)
    assert plan.chunk(p) == (2, 5) and plan.valid_share(p) == 1.0
    for direction in ("fwd", "bwd"):
        split = [launch for launch in plan_launches(direction, p, plan) if "CHUNK_C" in launch.constexprs]
        assert split and all(launch.grid == (32, 4, 5) and launch.constexprs["CHUNK_C"] == 2 for launch in split)
        assert _cost.predict(direction, p, plan, _cost.DEVICES["h100"]).programs == 32 * 4 * 5
    for other in (plan.fit(dataclasses.replace(p, channels_last=True)), dataclasses.replace(plan, split=1).fit(p)):
        assert other.chunks == 1
        assert all(launch.constexprs.get("CHUNK_C", 0) == 0 for launch in plan_launches("fwd", p, other))
