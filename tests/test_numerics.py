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
    make_params,
    reference,
    torch_group_norm,
)

import gn_triton


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
