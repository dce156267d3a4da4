"""Numerical trust: shifted data, constant groups, NaN/Inf containment, determinism, gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from cases import FUSED_AND_SPLIT, FUSED_AND_SPLIT_LONG_ROWS
from gn_testing import (
    assert_matches_reference,
    error,
    forced,
    forward_backward,
    make_input,
    make_modulation,
    make_params,
    reference,
    torch_group_norm,
)

import gn_triton
from gn_triton import _tuning


@pytest.mark.parametrize("grad", ["random", "correlated"])
@pytest.mark.parametrize("path", FUSED_AND_SPLIT_LONG_ROWS)
def test_large_mean_offset_fp32(path, grad, device):
    """fp32 input 1e4 + N(0, 1) within fp32's tolerance of float64 (torch's CPU kernel is ~1e-4
    off there, since an fp32 mean near 1e4 is itself quantised to ~1e-3). A gradient correlated with
    the normalised input makes every term of dx matter, the mean's residual included."""
    x = make_input((1, 4, 64, 64), torch.float32, device, offset=1e4)
    w, b = make_params(4, torch.float32, device)
    dy = torch.randn_like(x)
    if grad == "correlated":
        dy = (x.double() - 1e4).float() + 0.1 * dy
    with forced(path):
        assert_matches_reference(x, 2, w, b, dy=dy)


def test_large_offset_beats_torch(device):
    """The shifted statistics are more accurate than torch's own fp32 kernel on offset data."""
    x = make_input((2, 4, 32, 32), torch.float32, device, offset=3e4)
    y = gn_triton.group_norm(x, 2)
    y_ref = reference(x, 2)[0]
    assert error(y, y_ref) < error(F.group_norm(x, 2), y_ref)


@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
def test_fp64_two_element_groups_match_torch(path, device):
    """eps reaches fp64 kernels exactly (as an fp32 pair), so groups whose variance is near eps (two
    elements, variance ~1e-6 against eps 1e-5) match torch's own fp64 kernel to rounding; with eps
    rounded to fp32 the input gradient was ~2.5e-8 off."""
    x = make_input((3, 8, 2), torch.float64, device, scale=1e-3)
    w, b = make_params(8, torch.float64, device)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    with forced(path):
        ours = forward_backward(gn_triton.group_norm, x, 8, w, b, dy)
    theirs = forward_backward(torch_group_norm, x, 8, w, b, dy)
    for name, o, t in zip(("y", "dx", "dweight", "dbias"), ours[:4], theirs[:4]):
        assert error(o, t) < 1e-12, name


@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
def test_constant_group(path, device):
    """A zero-variance group: dweight gets exactly zero from it, and everything matches the reference."""
    x = make_input((3, 4, 8, 8), torch.float32, device)
    x[:, :2] = 7.25  # group 0 is constant in every sample
    w, b = make_params(4, torch.float32, device)
    with forced(path):
        y, dx, dw, db, _, _ = assert_matches_reference(x, 2, w, b)
    assert torch.all(dw[:2] == 0), dw[:2]


@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
@pytest.mark.parametrize("position", ["first element", "middle"])
def test_nonfinite_stays_in_its_group(path, position, device):
    """A NaN in one group and an Inf in another make those groups' output and dx NaN (as torch) and
    leave the others untouched, including neighbours in the same program (4 groups per program):
    the reference comparison fails on a NaN the reference does not have, or one it has and we lack.
    The first element of a group is its pilot value (the shift of its statistics)."""
    x = make_input((2, 8, 5, 5), torch.float32, device)
    where = (2, 0, 0) if position == "first element" else (3, 2, 4)  # group 1 of a sample
    x[(1, *where)] = float("nan")
    x[(0, where[0] + 2, *where[1:])] = float("inf")  # group 2 of sample 0
    w, b = make_params(8, torch.float32, device)
    with forced(path):
        y, dx, *_ = assert_matches_reference(x, 4, w, b)
    for out in (y, dx):
        assert torch.isnan(out[1, 2:4]).all() and torch.isnan(out[0, 4:6]).all()


@pytest.mark.parametrize("path", FUSED_AND_SPLIT_LONG_ROWS)
def test_bitwise_deterministic(path, device):
    x = make_input((2, 6, 16, 16), torch.float32, device, offset=1.0)
    w, b = make_params(6, torch.float32, device)
    dy = torch.randn_like(x)
    with forced(path):
        first = forward_backward(gn_triton.group_norm, x, 3, w, b, dy)
        second = forward_backward(gn_triton.group_norm, x, 3, w, b, dy)
    for a, c in zip(first[:4], second[:4]):
        assert torch.equal(a, c)


@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
def test_gradcheck_float64(path, device):
    """Numerical vs analytical Jacobian (fast mode: random projections, to keep the interpreter quick)."""
    x = make_input((2, 4, 5), torch.float64, device).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(4, torch.float64, device))
    with forced(path):
        assert torch.autograd.gradcheck(lambda x, w, b: gn_triton.group_norm(x, 2, w, b), (x, w, b), fast_mode=True)


def test_inputs_not_modified(device):
    x = make_input((2, 6, 4, 4), torch.float16, device, layout="channels_last").requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(6, torch.float32, device))
    dy = torch.randn(x.shape, dtype=x.dtype, device=device)
    before = [t.detach().clone() for t in (x, w, b, dy)]
    strides = [t.stride() for t in (x, w, b, dy)]
    gn_triton.group_norm(x, 3, w, b).backward(dy)
    for t, t0, s in zip((x, w, b, dy), before, strides):
        assert torch.equal(t.detach(), t0) and t.stride() == s


# The statistics loops accumulate per lane (each thread sums its own elements' x - shift and its
# square, one reduction after the loop): the cases where that form could lose accuracy, against
# float64, at fp32's level (1e-6 relative).
LONG_ROW_PLANS = {  # few programs with large tiles: the interpreter costs per program and iteration
    "fused": dict(split=1, groups_per_program=1, block_c=4, block_s=65536),
    "split": dict(split=4, groups_per_program=1, block_c=4, block_s=16384, wave_blocks=0),
}
OUTLIER_PLANS = {
    "fused": dict(split=1, groups_per_program=1, block_c=4, block_s=1024),
    "split": dict(split=4, groups_per_program=1, block_c=4, block_s=256, wave_blocks=0),
    # Each group's 4 channels in 2 chunks: the outlier's chunk merges with one that never sees it.
    "split, channel chunks": dict(split=4, groups_per_program=1, block_c=2, block_s=256, wave_blocks=0, chunks=2),
}


def assert_fp32_level(x, num_groups, plan, hard_for_torch=False):
    """gn_triton's (y, dx, dweight, dbias) under `plan` within 1e-6 (relative) of float64, each. With
    hard_for_torch, the data is also checked to be what the test says it is: one where torch's own
    fp32 kernel loses accuracy (its worst output beyond 1e-5, measured 4e-5 to 6e-3 on these cases),
    so that the 1e-6 bound tests the statistics' form and not easy data."""
    w, b = make_params(x.shape[1], torch.float32, x.device)
    dy = torch.randn_like(x)
    with _tuning.override_plan(**plan):
        ours = forward_backward(gn_triton.group_norm, x, num_groups, w, b, dy)
    theirs = forward_backward(torch_group_norm, x, num_groups, w, b, dy)
    ref = reference(x, num_groups, w, b, dy)
    ours, theirs = ([error(t, r) for t, r in zip(ts[:4], ref[:4])] for ts in (ours, theirs))
    assert max(ours) < 1e-6, f"gn_triton {ours}, torch {theirs}"
    if hard_for_torch:
        assert max(theirs) > 1e-5, f"torch's fp32 kernel is as good as gn_triton here: {theirs}"


@pytest.mark.parametrize("path", LONG_ROW_PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_group(dtype, path, device):
    """One group of 2^20 elements: every lane sums 2^20 / tile elements."""
    x = make_input((1, 4, 2**18), dtype, device, offset=1.0)
    if dtype == torch.float32:
        assert_fp32_level(x, 1, LONG_ROW_PLANS[path])
    else:
        w, b = make_params(4, dtype, device)
        with _tuning.override_plan(**LONG_ROW_PLANS[path]):
            assert_matches_reference(x, 1, w, b)


@pytest.mark.parametrize("path", OUTLIER_PLANS)
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("outlier", [0.0, 1e3, 1e4])
def test_outlier_first_element(outlier, offset, path, device):
    """A group's first element (its pilot) `outlier` away from the rest, on data offset by `offset`:
    a shift at the pilot would cancel in sum(e^2) - sum(e)^2/n, and partial means relative to it
    would be rounded at the outlier's scale. The statistics are taken relative to a reference inside
    the data (kernels/_tile.py group_reference): every output within 1e-6 (with the pilot as the
    reference, dx reached 9e-7 and dweight 6e-6 here; torch's own fp32 kernel on offset data 1.9e-4
    and 6.9e-4)."""
    x = make_input((2, 8, 4096), torch.float64, device, offset=offset)
    x[:, 0, 0] += outlier
    x[:, 4, 0] -= outlier
    assert_fp32_level(x.float(), 2, OUTLIER_PLANS[path], hard_for_torch=offset > 0)


@pytest.mark.parametrize("path", OUTLIER_PLANS)
@pytest.mark.parametrize("start, stop", [(-1.0, 1.0), (1e3, 1.1e3)])
def test_ramp(start, stop, path, device):
    """Values increasing along each group: every span and every lane sees a different mean."""
    ramp = torch.linspace(start, stop, 8 * 4096, dtype=torch.float64, device=device).reshape(1, 8, 4096)
    x = (ramp.repeat(2, 1, 1) + 1e-3 * torch.randn(2, 8, 4096, dtype=torch.float64, device=device)).float()
    assert_fp32_level(x, 2, OUTLIER_PLANS[path], hard_for_torch=start > 0)


# The split path's channel chunks (Plan.chunks: a group's channels over several programs, so that a
# group of 10 channels needs no 16-row tiles): odd sizes, offset data, every epilogue, forward and
# every gradient, against float64 at fp32's tolerance. C/G = 5 in 3 chunks gives chunks of 2, 2 and 1
# channels; a span of 63 positions leaves a masked tail; channels_last runs the plan unchunked.
CHUNK_PLANS = {
    "3 chunks, 2-row tiles": dict(split=3, groups_per_program=1, block_c=2, block_s=16, wave_blocks=0, chunks=3),
    "5 chunks of 1 channel": dict(split=2, groups_per_program=1, block_c=1, block_s=32, wave_blocks=0, chunks=5),
}
CHUNK_EPILOGUES = {
    "affine": dict(),
    "no affine": dict(weight=False, bias=False),
    "silu, scale+shift": dict(activation="silu", scale=True, shift=True),
    "gelu, scale": dict(activation="gelu", scale=True),
    "gelu_tanh, shift, bias only": dict(activation="gelu_tanh", shift=True, weight=False),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("epilogue", CHUNK_EPILOGUES)
@pytest.mark.parametrize("plan", CHUNK_PLANS)
def test_channel_chunks(plan, epilogue, layout, device):
    fields = dict(CHUNK_EPILOGUES[epilogue])
    activation = fields.pop("activation", None)
    scale, shift = fields.pop("scale", False), fields.pop("shift", False)
    x = make_input((3, 10, 7, 9), torch.float32, device, offset=1e3, scale=2.0, layout=layout)
    w, b = make_params(10, torch.float32, device, **fields)
    scale, shift = make_modulation(3, 10, torch.float32, device, scale=scale, shift=shift)
    with _tuning.override_plan(**CHUNK_PLANS[plan]):
        assert_matches_reference(x, 2, w, b, activation=activation, scale=scale, shift=shift)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_channel_chunks_fp32_level(offset, device):
    """fp32 relative error <= 1e-6 against float64 with the channels in chunks (C/G = 10 in 5 chunks
    of 2, as the planner cuts the groups of C320 G32), on data offset by `offset`."""
    x = make_input((1, 20, 64, 64), torch.float32, device, offset=offset)
    assert_fp32_level(x, 2, dict(split=2, groups_per_program=1, block_c=2, block_s=1024, wave_blocks=0, chunks=5))


def test_channel_chunks_are_deterministic(device):
    """Chunked partials merge in a fixed order: two runs agree bit for bit."""
    x = make_input((2, 10, 9, 9), torch.float32, device, offset=3.0)
    w, b = make_params(10, torch.float32, device)
    dy = torch.randn_like(x)
    with _tuning.override_plan(**CHUNK_PLANS["3 chunks, 2-row tiles"]):
        first, second = (forward_backward(gn_triton.group_norm, x, 2, w, b, dy) for _ in range(2))
    for a, b_ in zip(first[:4], second[:4]):
        assert torch.equal(a, b_)
