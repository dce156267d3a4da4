"""Differentially private training with Opacus, the per-sample world GroupNorm is for: a small CNN
whose GroupNorms are convert_model-ed gets the per-sample gradients of the unconverted model, in both
of Opacus's modes, and a PrivacyEngine step runs.

Opacus finds its per-layer grad samplers by exact type, so a gn_triton.GroupNorm (a subclass) goes
through its functorch path, vmap(grad(layer)) over the samples, in either mode: that is
gn_triton's torch.func support (the vmapped samples fold into the batch of one kernel call)."""

import copy

import pytest
import torch

import gn_triton

opacus = pytest.importorskip("opacus")


def small_cnn(device):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3),
        torch.nn.GroupNorm(4, 8),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).to(device, torch.float64)


def per_sample_grads(model, force_functorch, x, target):
    gsm = opacus.GradSampleModule(model, force_functorch=force_functorch)
    torch.nn.functional.cross_entropy(gsm(x), target, reduction="sum").backward()
    grads = {name: p.grad_sample.clone() for name, p in gsm.named_parameters()}
    gsm._close()
    return grads


@pytest.mark.parametrize("activation_fusion", [False, True], ids=["converted", "converted, SiLU fused"])
@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks", "functorch"])
def test_per_sample_gradients_match_the_unconverted_model(force_functorch, activation_fusion, device):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, device=device)
    target = torch.tensor([0, 2, 1], device=device)
    plain = small_cnn(device)
    converted = gn_triton.convert_model(copy.deepcopy(plain), activation_fusion=activation_fusion)
    assert type(converted[1]) is gn_triton.GroupNorm
    expected = per_sample_grads(plain, force_functorch, x, target)
    got = per_sample_grads(converted, force_functorch, x, target)
    assert got.keys() == expected.keys()
    for name, g in got.items():
        assert g.shape == (3, *dict(plain.named_parameters())[name.removeprefix("_module.")].shape)
        torch.testing.assert_close(g, expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_a_privacy_engine_step_runs(device):
    model = gn_triton.convert_model(small_cnn(device), activation_fusion=True)
    data = torch.utils.data.TensorDataset(
        torch.randn(6, 2, 6, 6, dtype=torch.float64, device=device), torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = opacus.PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=torch.utils.data.DataLoader(data, batch_size=3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, target = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
