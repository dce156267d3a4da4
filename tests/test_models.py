"""Fitting real models: model conversion (and its inverse), torch.export, autocast, DDP (mixed parameter
dtypes are in test_correctness)."""

import pytest
import torch
from gn_testing import assert_matches_reference, error

import gn_triton
from gn_triton.modules import FusedIntoGroupNorm


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
    if fusion:
        assert [model.body[1].activation, model.body[4].activation] == ["silu", "gelu_tanh"]
        assert isinstance(model.body[2], FusedIntoGroupNorm) and isinstance(model.body[5], FusedIntoGroupNorm)
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    assert error(y, expected) < 1e-9
    for g, e in zip((p.grad for p in model.parameters()), expected_grads):
        assert error(g, e) < 1e-9
    optimizer.step()  # the optimizer built before conversion still drives the same tensors

    gn_triton.revert_model(model)
    assert all(type(m) is torch.nn.GroupNorm for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert type(model.body[2]) is torch.nn.SiLU and type(model.body[5]) is torch.nn.GELU
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_convert_top_level_module(device):
    norm = torch.nn.GroupNorm(2, 4, device=device)
    assert type(gn_triton.convert_model(norm)) is gn_triton.GroupNorm


def test_torch_export(device):
    model = gn_triton.convert_model(make_block(device), activation_fusion=True)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    exported = torch.export.export(model, (x,))
    assert "gn_triton.group_norm_fwd" in str(exported.graph)
    assert error(exported.module()(x), model(x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_16bit(dtype, device):
    """Under autocast torch runs group_norm in fp32 (fp32 output); gn_triton keeps the 16-bit dtype
    of its input, with fp32 statistics inside and fp32 parameters used as they are."""
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 8, 3, device=device)
    norm = gn_triton.GroupNorm(4, 8, device=device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        h = conv(x)
        y = norm(h)
    assert h.dtype == dtype and y.dtype == dtype
    expected = assert_matches_reference(h.detach(), 4, norm.weight.detach(), norm.bias.detach())[0]
    assert torch.equal(y, expected)  # autocast leaves gn_triton's op as it is outside autocast
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
