"""Fitting real models: model conversion (and its inverse), torch.export, autocast, DDP (mixed parameter
dtypes are in test_correctness)."""

import contextlib
import copy
import pickle
import warnings
from unittest import mock

import pytest
import torch
from gn_testing import error

import gn_triton
from gn_triton import modules
from gn_triton.modules import FusingSequential


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.GroupNorm(4, 8),
            torch.nn.SiLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.GroupNorm(2, 8),
            torch.nn.GELU(approximate="tanh"),
        )
        self.heads = torch.nn.ModuleList([torch.nn.GroupNorm(8, 8), torch.nn.GroupNorm(1, 8, affine=False)])

    def forward(self, x):
        h = self.body(x)
        return self.heads[1](self.heads[0](h) + h)


def make_block(device):
    torch.manual_seed(5)
    block = Block().to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.normal_()
                m.bias.normal_()
    return block


@pytest.mark.parametrize("fusion", [False, True], ids=["plain", "activation_fusion"])
def test_convert_model_keeps_results_params_and_optimizer(fusion, device):
    model = make_block(device)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    params = list(model.parameters())
    state_keys = list(model.state_dict().keys())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert gn_triton.convert_model(model, activation_fusion=fusion) is model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 and all(type(m) is gn_triton.GroupNorm for m in norms)
    assert all(a is b for a, b in zip(model.parameters(), params))  # no copies
    assert list(model.state_dict().keys()) == state_keys
    assert all(m.activation is None for m in norms)  # the modules themselves never change what they compute
    assert type(model.body) is (FusingSequential if fusion else torch.nn.Sequential)
    assert type(model.body[2]) is torch.nn.SiLU and type(model.body[5]) is torch.nn.GELU
    model.zero_grad()
    with fused_calls() as activations:
        y = model(x)
    assert activations == (["silu", "gelu_tanh"] if fusion else [])
    y.square().sum().backward()
    assert error(y, expected) < 1e-9
    for g, e in zip((p.grad for p in model.parameters()), expected_grads):
        assert error(g, e) < 1e-9
    optimizer.step()  # the optimizer built before conversion still drives the same tensors

    gn_triton.revert_model(model)
    assert all(type(m) is torch.nn.GroupNorm for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert type(model.body[2]) is torch.nn.SiLU and type(model.body[5]) is torch.nn.GELU
    assert all(a is b for a, b in zip(model.parameters(), params))


@contextlib.contextmanager
def fused_calls():
    """The activations of the fused calls FusingSequentials make inside the block (the modules' own
    calls pass none)."""
    activations = []
    real = modules.group_norm

    def spy(*args, activation=None, **kwargs):
        if activation is not None:
            activations.append(activation)
        return real(*args, activation=activation, **kwargs)

    with mock.patch.object(modules, "group_norm", spy):
        yield activations


def _two_paths(norm, act):
    """A norm shared by a Sequential (with its activation) and a second path that reads it alone."""

    class TwoPaths(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), norm, act)
            self.norm = norm

        def forward(self, x):
            return self.seq(x) + self.norm(self.seq[0](x))

    return TwoPaths()


def _two_sequentials(norm, act):
    return torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), norm, act), torch.nn.Sequential(norm)])


# name -> (build(norm, act) -> model, run(model, x, seen) -> output; `seen` collects what hooks observe,
# fused: whether the converted model still runs the pair as one call)
OBSERVED = {
    "norm shared with a second path": (_two_paths, lambda m, x, seen: m(x), True),
    "norm in two Sequentials": (
        _two_sequentials, lambda m, x, seen: m[0](x) + m[1](m[0][0](x)), True),
    "slice ending at the norm": (
        lambda n, a: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), n, a), lambda m, x, seen: m[:2](x), False),
    "forward hook on the norm": (
        lambda n, a: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), n, a),
        lambda m, x, seen: (m[1].register_forward_hook(lambda mod, i, o: seen.append(o)), m(x))[1], False),
    "forward pre-hook on the activation": (
        lambda n, a: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), n, a),
        lambda m, x, seen: (m[2].register_forward_pre_hook(lambda mod, i: seen.append(i[0])), m(x))[1], False),
    "hook on the activation": (
        lambda n, a: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), n, a),
        lambda m, x, seen: (m[2].register_forward_hook(lambda mod, i, o: seen.append(o)), m(x))[1], False),
}  # fmt: skip


@pytest.mark.parametrize("case", OBSERVED)
def test_activation_fusion_changes_nothing_another_caller_sees(case, device):
    """Every other use of a fused pair's modules computes what torch computes, hooks see torch's
    values and run, and the output and every gradient equal the unconverted model's (float64)."""
    build, call, fused = OBSERVED[case]
    torch.manual_seed(9)
    plain = build(torch.nn.GroupNorm(4, 8), torch.nn.SiLU()).to(device, torch.float64)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_()
                m.bias.normal_()
    converted = gn_triton.convert_model(copy.deepcopy(plain), activation_fusion=True)
    assert any(type(m) is FusingSequential for m in converted.modules())
    x = torch.randn(2, 3, 5, 3, dtype=torch.float64, device=device)
    results = []
    for model in (plain, converted):
        seen = []
        with fused_calls() as activations:
            y = call(model, x, seen)
        y.square().sum().backward()
        grads = [p.grad for p in model.parameters()]
        results.append((y, seen, grads, activations))
    (y, seen, grads, activations), (e_y, e_seen, e_grads, _) = results[1], results[0]
    assert error(y, e_y) < 1e-9
    assert len(seen) == len(e_seen) and all(error(a, b) < 1e-9 for a, b in zip(seen, e_seen))
    assert all(error(g, e) < 1e-9 for g, e in zip(grads, e_grads))
    assert activations == (["silu"] if fused else [])


class ChannelsFirstGroupNorm(torch.nn.GroupNorm):
    """A subclass with its own constructor (channels first, as timm's) and torch's forward."""

    def __init__(self, num_channels, num_groups=2, **kwargs):
        super().__init__(num_groups, num_channels, **kwargs)

    def describe(self):
        return f"{self.num_groups} groups"


class GroupNormSiLU(torch.nn.GroupNorm):
    """A subclass with a forward of its own: convert_model must leave it alone, and say so."""

    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


def test_subclasses_with_torchs_forward_convert_and_others_are_reported(device):
    torch.manual_seed(3)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), ChannelsFirstGroupNorm(8, eps=1e-3), GroupNormSiLU(4, 8), torch.nn.GroupNorm(2, 8)
    ).to(device, torch.float64)
    x = torch.randn(2, 3, 5, 3, dtype=torch.float64, device=device)
    model = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match=r"GroupNormSiLU\): '2'"):
        assert gn_triton.convert_model(model) is model
    assert gn_triton.modules.unconverted_group_norms(model) == ["2"]
    assert type(model[2]) is GroupNormSiLU and type(model[3]) is gn_triton.GroupNorm
    sub = model[1]
    assert isinstance(sub, gn_triton.GroupNorm) and isinstance(sub, ChannelsFirstGroupNorm)
    assert (
        type(sub).__name__ == "ChannelsFirstGroupNorm" and sub.describe() == "2 groups" and repr(sub) == repr(plain[1])
    )
    assert error(model(x), plain(x)) < 1e-12
    h = model[0](x)
    assert torch.equal(sub(h), gn_triton.group_norm(h, 2, sub.weight, sub.bias, 1e-3))  # gn_triton's forward runs
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied[1]) is type(sub) and error(copied(x), plain(x)) < 1e-12
    gn_triton.revert_model(model)
    assert [type(m) for m in model[1:]] == [ChannelsFirstGroupNorm, GroupNormSiLU, torch.nn.GroupNorm]
    assert not hasattr(model[1], "activation")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gn_triton.convert_model(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)))  # nothing left: no warning


def test_convert_top_level_module(device):
    norm = torch.nn.GroupNorm(2, 4, device=device)
    assert type(gn_triton.convert_model(norm)) is gn_triton.GroupNorm


def test_torch_export(device):
    model = gn_triton.convert_model(make_block(device), activation_fusion=True)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    exported = torch.export.export(model, (x,))
    assert "gn_triton.group_norm_fwd" in str(exported.graph)
    assert error(exported.module()(x), model(x)) < 1e-12


@pytest.mark.parametrize("keep_input_dtype", [False, True], ids=["torch's rule", "keep_input_dtype"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_follows_torchs_dtype(dtype, keep_input_dtype, device):
    """Under autocast the converted module returns the dtype torch's own nn.GroupNorm returns on that
    device (CUDA: fp32 for 16-bit input; CPU: the input's dtype), or the input's with keep_input_dtype;
    values within 2x torch's own error against float64 (plus a floor: the 2x rule, CONTRIBUTING)."""
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 8, 3, device=device)
    plain = torch.nn.GroupNorm(4, 8, device=device)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    norm = gn_triton.convert_model(copy.deepcopy(plain), keep_input_dtype=keep_input_dtype)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        h = conv(x)
        y, theirs = norm(h), plain(h)
    assert h.dtype == dtype
    assert y.dtype == (dtype if keep_input_dtype else theirs.dtype)
    expected = torch.nn.functional.group_norm(h.double(), 4, plain.weight.double(), plain.bias.double())
    assert error(y, expected) <= 2 * error(theirs, expected) + 1e-3
    y.float().square().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and torch.isfinite(norm.weight.grad).all()


def test_ddp_step_matches_single_process(tmp_path):
    """GroupNorm has no cross-sample statistics: one DDP step on 2 processes (gloo, CPU) with half
    the batch each gives the parameters of one full-batch step on one process."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, TRITON_INTERPRET="1", GN_DDP_PORT=str(port))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max parameter difference" in proc.stdout
    assert float(proc.stdout.split("max parameter difference")[1].split()[0]) < 1e-12
