"""Fused epilogues: act(GroupNorm(x)*(1 + scale) + shift) in one pass, gradients through the recomputed
pre-activation, and the module as nn.Sequential(GroupNorm, act). (Their bad arguments, custom-op
checks and CPU fallback are in test_api's tables.)"""

import pytest
import torch
from cases import ACTIVATIONS, AFFINE, FUSED_AND_SPLIT, MODULATIONS, SIXTEEN_BIT
from gn_testing import (
    TOLERANCE,
    TORCH_ACTIVATIONS,
    assert_close,
    assert_matches_reference,
    forced,
    make_input,
    make_modulation,
    make_params,
    torch_group_norm,
)

import gn_triton


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "bias only", "neither"])
def test_activation_matches_reference(activation, path, dtype, affine, device):
    x = make_input((2, 6, 5, 7), dtype, device, offset=2.0, scale=1.5)
    w, b = make_params(6, dtype, device, **AFFINE[affine])
    with forced(path):
        assert_matches_reference(x, 3, w, b, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_activation_16bit_channels_last(activation, dtype, device):
    """16-bit: error <= 2x that of torch's own GroupNorm followed by its activation, plus a floor."""
    x = make_input((2, 8, 4, 6), dtype, device, layout="channels_last")
    w, b = make_params(8, dtype, device)
    assert_matches_reference(x, 4, w, b, activation=activation)


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
    assert_close(fused(x), TORCH_ACTIVATIONS[activation](plain(x)), TOLERANCE[torch.float64])


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        gn_triton.GroupNorm(2, 4, activation="tanh")


# Per-sample scale-shift ("scale-shift norm"): y = act(GroupNorm(x)*(1 + scale) + shift), (N, C) each.
# One group per program ("split 3, small tiles") puts blocks at channel offsets other than 0.
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("path", [*FUSED_AND_SPLIT, "split 3, small tiles"])
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("affine", ["weight+bias", "neither"], ids=["affine", "no affine"])
def test_scale_shift_matches_reference(activation, path, modulation, affine, device):
    x = make_input((2, 8, 5, 3), torch.float64, device, offset=1.0)
    w, b = make_params(8, torch.float64, device, **AFFINE[affine])
    scale, shift = make_modulation(2, 8, torch.float64, device, **MODULATIONS[modulation])
    with forced(path):
        assert_matches_reference(x, 4, w, b, activation=activation, scale=scale, shift=shift)


def test_scale_shift_bf16_channels_last(device):
    """bf16 activations with fp32 modulation (the usual mix in diffusion models), NHWC: dscale and
    dshift are fp32, and the 16-bit rule is against torch's ops on the same mix."""
    x = make_input((2, 8, 4, 6), torch.bfloat16, device, layout="channels_last")
    w, b = make_params(8, torch.float32, device)
    scale, shift = make_modulation(2, 8, torch.float32, device)
    assert_matches_reference(x, 4, w, b, activation="silu", scale=scale, shift=shift)


def test_module_forward_takes_scale_shift(device):
    norm = gn_triton.GroupNorm(2, 4, device=device, dtype=torch.float64, activation="silu")
    x = make_input((3, 4, 5), torch.float64, device)
    scale, shift = make_modulation(3, 4, torch.float64, device)
    expected = torch_group_norm(x, 2, norm.weight, norm.bias, activation="silu", scale=scale, shift=shift)
    assert_close(norm(x, scale=scale, shift=shift), expected, TOLERANCE[torch.float64])


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_large_activation_inputs_give_their_limits_without_warnings(device, activation):
    """|z| far past exp's range (a weight of 200): the activation's limits, as torch gives them, and no
    numpy overflow warning from Triton's interpreter (a GPU's float semantics)."""
    import warnings

    x = make_input((2, 4, 8), device=device)
    w = torch.full((4,), 200.0, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = gn_triton.group_norm(x, 2, w, activation=activation)
    expected = TORCH_ACTIVATIONS[activation](torch.nn.functional.group_norm(x.double(), 2, w.double()))
    assert torch.isfinite(y).all()
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
