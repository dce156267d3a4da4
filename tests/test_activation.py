"""Fused activation epilogues: act(GroupNorm(x)) in one pass, gradients through the recomputed
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
    args = (torch.randn_like(y), x, w, b, mean, mean_lo, rstd, 2, [True, True, True], "gelu")
    torch.library.opcheck(_ops.group_norm_bwd, args)
