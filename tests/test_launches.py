"""The launch table (gn_triton/_launches.py), which the launcher runs, against what reaches the
kernels: for every forced plan of the suite, forward and backward, with and without scale/shift and
for each set of gradients asked for, the same kernels in the same order, on the same grids, with the
same keyword arguments (the correctness tests show those launches compute the right results); and
the cost model's launch count is the table's."""

import contextlib

import pytest
import torch
from cases import PLANS
from gn_testing import forced, make_input, make_modulation, make_params

import gn_triton
from gn_triton import _cost, _launch
from gn_triton._launches import plan_launches


class _Recorder:
    """A kernel's stand-in: records kernel[grid](*args, **kwargs), then launches the real one."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def recording(monkeypatch):
    """Yields (launches, calls): every kernel launch, and every (direction, problem, plan, needs)."""
    launches, calls = [], []
    for name, kernel in _launch.KERNELS.items():
        monkeypatch.setitem(_launch.KERNELS, name, _Recorder(name, kernel, launches))
    fwd, bwd = _launch._launch_fwd, _launch._launch_bwd

    def launch_fwd(x, y, affine, mean, mean_lo, rstd, eps, p, plan):
        calls.append(("fwd", p, plan, None))
        return fwd(x, y, affine, mean, mean_lo, rstd, eps, p, plan)

    def launch_bwd(dy, x, affine, mean, mean_lo, rstd, grads, p, plan):
        calls.append(("bwd", p, plan, tuple(g.numel() > 0 for g in grads)))
        return bwd(dy, x, affine, mean, mean_lo, rstd, grads, p, plan)

    monkeypatch.setattr(_launch, "_launch_fwd", launch_fwd)
    monkeypatch.setattr(_launch, "_launch_bwd", launch_bwd)
    yield launches, calls


@pytest.mark.parametrize("plan", [p for p in PLANS if "large" not in p])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("wanted", ["all", "x only", "parameters only"])
def test_table_matches_the_launcher(monkeypatch, device, plan, modulated, wanted):
    size, groups = (2, 8, 5, 7), 4
    x = make_input(size, device=device, offset=2.0)
    w, b = make_params(8, device=device)
    scale, shift = make_modulation(2, 8, device=device) if modulated else (None, None)
    leaves = dict(x=x, w=w, b=b, scale=scale, shift=shift)
    grad = {"all": set(leaves), "x only": {"x"}, "parameters only": {"w", "b", "scale", "shift"}}[wanted]
    leaves = {k: v.clone().requires_grad_(k in grad) if v is not None else None for k, v in leaves.items()}
    with recording(monkeypatch) as (launches, calls), forced(plan):
        y = gn_triton.group_norm(leaves["x"], groups, leaves["w"], leaves["b"], scale=leaves["scale"],
                                 shift=leaves["shift"], activation="silu")  # fmt: skip
        y.backward(torch.randn_like(y))
    expected = [launch for direction, p, used, needs in calls for launch in plan_launches(direction, p, used, needs)]
    assert [(n, g) for n, g, _ in launches] == [(e.kernel, e.grid) for e in expected]
    for (name, _, kwargs), e in zip(launches, expected):
        assert kwargs == e.constexprs, name
    assert launches, "no kernel ran"
    assert any("dscale_shift" in n for n, _, _ in launches) == (modulated and wanted != "x only")


def test_the_cost_model_counts_the_tables_launches():
    from gn_triton._tuning import Plan, Problem

    base = dict(N=2, C=64, S=4096, G=32, dtype=torch.bfloat16, channels_last=False, has_weight=True, has_bias=True)
    for extra in ({}, dict(has_scale=True, has_shift=True)):
        p = Problem(**base, **extra)
        for plan in (Plan(split=1), Plan(split=4, block_s=256, wave_blocks=8)):
            for direction in ("fwd", "bwd"):
                predicted = _cost.predict(direction, p, plan, _cost.DEVICES["h100"]).launches
                assert predicted == len(plan_launches(direction, p, plan))
    split = Plan(split=4, block_s=256, wave_blocks=8)
    plain, modulated = Problem(**base), Problem(**base, has_scale=True, has_shift=True)
    # the dscale/dshift reduction is one more backward launch
    assert (_cost.predict("bwd", modulated, split, _cost.DEVICES["h100"]).launches
            == _cost.predict("bwd", plain, split, _cost.DEVICES["h100"]).launches + 1)  # fmt: skip


def test_channel_chunks_are_the_split_grids_third_axis():
    """A split plan with a group's channels in chunks runs (blocks, spans, chunks) programs, each with
    the chunk's channels as CHUNK_C; the cost model counts them; channels_last and the fused path have
    one chunk (CHUNK_C = 0, the whole block)."""
    import dataclasses

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
