"""Fused epilogues: act(GroupNorm(x)*(1 + scale) + shift) in one pass, gradients through the recomputed
pre-activation, the module as nn.Sequential(GroupNorm, act), and errors."""

import pytest
import torch
import torch.nn.functional as F
from gn_testing import TOLERANCE, error, forward_backward, kernel_eps, make_input, make_params

import gn_triton
from gn_triton import _launch, _ops, _tuning
from gn_triton.reference import group_norm_reference

ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
TORCH_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}
PLANS = {"fused": dict(split=1, block_c=2, block_s=8), "split": dict(split=3, block_c=2, block_s=4)}


def run(x, G, w, b, dy, activation, dtype=None):
    fn = lambda x, G, w, b, eps: gn_triton.group_norm(x, G, w, b, eps, activation=activation)
    return forward_backward(fn, x, G, w, b, dy, dtype=dtype)


def reference(x, G, w, b, dy, activation):
    eps = kernel_eps(1e-5) if x.dtype == torch.float64 else 1e-5
    fn = lambda x, G, w, b, _: group_norm_reference(x, G, w, b, eps, activation)
    return forward_backward(fn, x, G, w, b, dy, dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("path", PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "bias only", "neither"])
def test_matches_reference(activation, path, dtype, affine, device):
    x = make_input((2, 6, 5, 7), dtype, device, offset=2.0, scale=1.5)
    w, b = make_params(6, dtype, device, weight=affine == "weight+bias", bias=affine != "neither")
    dy = torch.randn(x.shape, dtype=dtype, device=device)
    with _tuning.override_plan(**PLANS[path]):
        ours = run(x, 3, w, b, dy, activation)
    for name, out, ref in zip(("y", "dx", "dweight", "dbias"), ours, reference(x, 3, w, b, dy, activation)):
        if ref is not None:
            assert error(out, ref) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_against_torch_error(activation, dtype, device):
    """16-bit: error <= 2x that of torch's own GroupNorm followed by its activation, plus a floor."""
    x = make_input((2, 8, 4, 6), dtype, device, layout="channels_last")
    w, b = make_params(8, dtype, device)
    dy = torch.randn(x.shape, device=device).to(dtype)
    ref = reference(x, 4, w, b, dy, activation)
    theirs = forward_backward(lambda x, G, w, b, eps: TORCH_ACT[activation](F.group_norm(x, G, w, b, eps)),
                              x, 4, w, b, dy)  # fmt: skip
    ours = run(x, 4, w, b, dy, activation)
    for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), ours, theirs, ref):
        assert error(o, r) <= 2 * error(t, r) + TOLERANCE[dtype], name
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_is_groupnorm_then_activation(activation, device):
    torch.manual_seed(3)
    plain = torch.nn.GroupNorm(2, 6, device=device, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    fused = gn_triton.GroupNorm(2, 6, device=device, dtype=torch.float64, activation=activation)
    fused.load_state_dict(plain.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert f"activation='{activation}'" in repr(fused)
    x = make_input((2, 6, 3, 4), torch.float64, device)
    assert error(fused(x), TORCH_ACT[activation](plain(x))) < 1e-9


def test_unknown_activation(device):
    x = make_input((2, 4, 3), torch.float32, device)
    with pytest.raises(ValueError, match="unknown activation='relu'"):
        gn_triton.group_norm(x, 2, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        gn_triton.GroupNorm(2, 4, activation="tanh")


def test_cpu_fallback_applies_activation(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    x = torch.randn(2, 4, 3, 3)
    for activation in ACTIVATIONS:
        expected = TORCH_ACT[activation](F.group_norm(x, 2))
        assert torch.equal(gn_triton.group_norm(x, 2, activation=activation), expected)


def test_opcheck_with_activation(device):
    x = make_input((2, 4, 3, 3), torch.float32, device)
    w, b = make_params(4, torch.float32, device)
    torch.library.opcheck(_ops.group_norm_fwd, (x, w, b, 2, 1e-5, "silu"))
    y, mean, mean_lo, rstd = _ops.group_norm_fwd(x, w, b, 2, 1e-5, "gelu")
    args = (torch.randn_like(y), x, w, b, mean, mean_lo, rstd, 2, [True, True, True, False, False], "gelu")
    torch.library.opcheck(_ops.group_norm_bwd, args)


# Per-sample scale-shift ("scale-shift norm"): y = act(GroupNorm(x)*(1 + scale) + shift), (N, C) each.
MOD_PLANS = {**PLANS, "split, 2 groups per program": dict(split=2, groups_per_program=2, block_c=2, block_s=4)}


def run_modulated(x, G, w, b, scale, shift, dy, activation, reference_eps=None):
    """(y, dx, dweight, dbias, dscale, dshift) of gn_triton, or of the reference with reference_eps."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, scale, shift)]
    if reference_eps is None:
        y = gn_triton.group_norm(leaves[0], G, leaves[1], leaves[2], activation=activation, scale=leaves[3],
                                 shift=leaves[4])  # fmt: skip
    else:
        doubled = [None if t is None else t.double() for t in leaves]
        y = group_norm_reference(doubled[0], G, doubled[1], doubled[2], reference_eps, activation, *doubled[3:])
    y.backward(dy if reference_eps is None else dy.double())
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("path", MOD_PLANS)
@pytest.mark.parametrize("modulation", ["scale+shift", "scale", "shift"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no affine"])
def test_scale_shift_matches_reference(activation, path, modulation, affine, device):
    x = make_input((2, 8, 5, 3), torch.float64, device, offset=1.0)
    w, b = make_params(8, torch.float64, device, weight=affine, bias=affine)
    scale = 0.5 * torch.randn(2, 8, dtype=torch.float64, device=device) if "scale" in modulation else None
    shift = torch.randn(2, 8, dtype=torch.float64, device=device) if "shift" in modulation else None
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    with _tuning.override_plan(**MOD_PLANS[path]):
        ours = run_modulated(x, 4, w, b, scale, shift, dy, activation)
    ref = run_modulated(x, 4, w, b, scale, shift, dy, activation, reference_eps=kernel_eps(1e-5))
    names = ("y", "dx", "dweight", "dbias", "dscale", "dshift")
    for name, out, r in zip(names, ours, ref):
        assert (out is None) == (r is None), name
        if r is not None:
            assert error(out, r) <= TOLERANCE[torch.float64], name


def test_scale_shift_bf16_channels_last(device):
    """bf16 activations with fp32 modulation (the usual mix in diffusion models), NHWC."""
    x = make_input((2, 8, 4, 6), torch.bfloat16, device, layout="channels_last")
    w, b = make_params(8, torch.float32, device)
    scale, shift = 0.3 * torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    dy = torch.randn(x.shape, device=device).to(torch.bfloat16)
    ours = run_modulated(x, 4, w, b, scale, shift, dy, "silu")
    ref = run_modulated(x, 4, w, b, scale, shift, dy, "silu", reference_eps=1e-5)
    assert ours[0].dtype == torch.bfloat16 and ours[0].is_contiguous(memory_format=torch.channels_last)
    assert ours[4].dtype == torch.float32 and ours[5].dtype == torch.float32
    for name, out, r in zip(("y", "dx", "dweight", "dbias", "dscale", "dshift"), ours, ref):
        assert error(out, r) <= 2e-2, name


def test_module_forward_takes_scale_shift(device):
    norm = gn_triton.GroupNorm(2, 4, device=device, dtype=torch.float64, activation="silu")
    x = make_input((3, 4, 5), torch.float64, device)
    scale, shift = (
        torch.randn(3, 4, dtype=torch.float64, device=device),
        torch.randn(3, 4, dtype=torch.float64, device=device),
    )
    expected = F.silu(F.group_norm(x, 2, norm.weight, norm.bias) * (1 + scale[..., None]) + shift[..., None])
    assert error(norm(x, scale=scale, shift=shift), expected) < 1e-9


BAD_MODULATION = [
    ("scale shape", dict(scale=torch.randn(2, 3)), RuntimeError, ["scale", "(2, 4)", "(2, 3)"]),
    ("shift shape", dict(shift=torch.randn(4)), RuntimeError, ["shift", "(4,)"]),
    ("integer scale", dict(scale=torch.ones(2, 4, dtype=torch.int64)), TypeError, ["scale", "torch.int64"]),
    ("shift on meta", dict(shift=torch.randn(2, 4, device="meta")), RuntimeError, ["same device", "shift", "meta"]),
]


@pytest.mark.parametrize("name,kwargs,exc,words", BAD_MODULATION, ids=[b[0] for b in BAD_MODULATION])
def test_bad_scale_shift(name, kwargs, exc, words, device):
    kwargs = {k: v.to(device) if v.device.type != "meta" else v for k, v in kwargs.items()}
    with pytest.raises(exc) as info:
        gn_triton.group_norm(torch.randn(2, 4, 3, device=device), 2, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_cpu_fallback_applies_scale_shift(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    x, scale, shift = torch.randn(2, 4, 3, 3), torch.randn(2, 4), torch.randn(2, 4)
    expected = F.gelu(F.group_norm(x, 2) * (1 + scale[..., None, None]) + shift[..., None, None])
    assert torch.equal(gn_triton.group_norm(x, 2, activation="gelu", scale=scale, shift=shift), expected)


def test_opcheck_with_scale_shift(device):
    x = make_input((2, 4, 3, 3), torch.float32, device)
    w, b = make_params(4, torch.float32, device)
    scale, shift = torch.randn(2, 4, device=device), torch.randn(2, 4, device=device)
    torch.library.opcheck(_ops.group_norm_fwd, (x, w, b, 2, 1e-5, "silu", scale, shift))
    y, mean, mean_lo, rstd = _ops.group_norm_fwd(x, w, b, 2, 1e-5, "silu", scale, shift)
    mask = [True, True, True, True, True]
    torch.library.opcheck(_ops.group_norm_bwd, (torch.randn_like(y), x, w, b, mean, mean_lo, rstd, 2, mask, "silu",
                                                scale, shift))  # fmt: skip
