"""A real model family end to end: diffusers' UNet2DModel and AutoencoderKL from small configs
(random init, nothing downloaded), converted with gn_triton.convert_model. Forward outputs and every
parameter gradient must match the unconverted model (float64: a tight tolerance, as only the order
of sums differs; fp64 kernels take eps as an fp32 pair, exact to ~2^-48). Needs the `models` extra
(diffusers)."""

import copy

import pytest
import torch

import gn_triton

diffusers = pytest.importorskip("diffusers")


def unet() -> torch.nn.Module:
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip


def vae() -> torch.nn.Module:
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip


def run(model, inputs):
    model.zero_grad()
    out = model(*inputs).sample
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("build,inputs", [
    (unet, lambda d: (torch.randn(2, 3, 8, 8, dtype=torch.float64, device=d), torch.tensor([10, 500], device=d))),
    (vae, lambda d: (torch.randn(1, 3, 16, 16, dtype=torch.float64, device=d),)),
], ids=["UNet2DModel", "AutoencoderKL"])  # fmt: skip
def test_converted_model_matches(build, inputs, device):
    torch.manual_seed(0)
    model = build().to(device=device, dtype=torch.float64)
    args = inputs(device)
    expected, expected_grads = run(model, args)
    converted = gn_triton.convert_model(copy.deepcopy(model), activation_fusion=True)
    n_norms = sum(type(m) is gn_triton.GroupNorm for m in converted.modules())
    assert n_norms == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) > 10
    out, grads = run(converted, args)
    scale = expected.abs().max()
    assert (out - expected).abs().max() <= 1e-9 * scale
    for name, g in grads.items():
        e = expected_grads[name]
        assert (g - e).abs().max() <= 1e-8 * e.abs().max().clamp_min(1e-3), name
