"""Autocast parity with torch: CUDA autocast runs group_norm in fp32 (16-bit input, fp32 output), CPU
autocast leaves the input's dtype; keep_input_dtype opts out. The rule is gn_triton._checks'
autocast_dtype; on a CPU the fp32-output path runs end to end by giving CPU autocast CUDA's rule."""

import pytest
import torch
import torch.nn.functional as F
from gn_testing import error as relative_error
from gn_testing import make_input, make_params, reference

import gn_triton
from gn_triton import _checks, _launch
from gn_triton.reference import TOLERANCE

BF16, F32 = torch.bfloat16, torch.float32

# (device type, autocast on, input dtype) -> output dtype: torch's rule
RULE = [
    ("cuda", True, torch.bfloat16, F32),
    ("cuda", True, torch.float16, F32),
    ("cuda", True, F32, F32),
    ("cuda", True, torch.float64, torch.float64),
    ("cuda", False, torch.bfloat16, torch.bfloat16),
    ("cpu", True, torch.bfloat16, torch.bfloat16),
    ("cpu", True, torch.float16, torch.float16),
]


@pytest.mark.parametrize("device_type,enabled,dtype,expected", RULE)
def test_policy(device_type, enabled, dtype, expected):
    assert _checks.autocast_dtype(dtype, device_type, enabled) == expected


def test_cpu_autocast_keeps_the_input_dtype_like_torch(device):
    """torch's own CPU rule, checked against torch, for the function, the module and convert_model."""
    x = make_input((2, 4, 3, 2), BF16, "cpu")
    w, b = make_params(4, F32, "cpu")
    model = gn_triton.convert_model(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)))
    with torch.autocast("cpu", dtype=BF16):
        expected = F.group_norm(x, 2, w, b).dtype
        assert expected == BF16
        assert gn_triton.group_norm(x, 2, w, b).dtype == expected
        assert gn_triton.GroupNorm(2, 4)(x).dtype == expected
        assert model(x).dtype == expected


@pytest.fixture
def cpu_autocast_runs_in_fp32(monkeypatch):
    """CPU autocast with CUDA's rule for group_norm, to run the fp32-output path without a GPU."""
    monkeypatch.setattr(_checks, "AUTOCAST_FP32_DEVICES", ("cuda", "cpu"))


def norm_of(path, w, b):
    """(what computes the norm of x, its weight and bias leaves): the function, a gn_triton.GroupNorm,
    or an nn.GroupNorm after convert_model."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    if path == "function":
        return (lambda x: gn_triton.group_norm(x, 2, w, b)), w, b
    m = (gn_triton.GroupNorm if path == "module" else torch.nn.GroupNorm)(2, 4, device=w.device)
    m.weight, m.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
    m = m if path == "module" else gn_triton.convert_model(torch.nn.Sequential(m))
    return m, (m.weight if path == "module" else m[0].weight), (m.bias if path == "module" else m[0].bias)


@pytest.mark.parametrize("path", ["function", "module", "convert_model"])
def test_fp32_output_from_16_bit_input(path, device, cpu_autocast_runs_in_fp32, monkeypatch):
    """Under autocast: fp32 output computed from the 16-bit input (the kernels read it as it is: no
    fp32 copy), right values, and gradients in each input's dtype."""
    x = make_input((2, 4, 3, 2), BF16, device, offset=2.0)
    w, b = make_params(4, F32, device)
    dy = torch.randn(x.shape, dtype=F32, device=device)
    launched = []
    real = _launch.ForwardProgram.__call__

    def spy(program, x, *args, **kwargs):
        launched.append((x.dtype, program.out_dtype))
        return real(program, x, *args, **kwargs)

    monkeypatch.setattr(_launch.ForwardProgram, "__call__", spy)
    norm, w_leaf, b_leaf = norm_of(path, w, b)
    x_leaf = x.clone().requires_grad_()
    with torch.autocast(device, dtype=BF16):
        y = norm(x_leaf)
    y.backward(dy)
    assert launched == [(BF16, F32)]
    assert y.dtype == F32 and x_leaf.grad.dtype == BF16 and w_leaf.grad.dtype == b_leaf.grad.dtype == F32
    ref = reference(x, 2, w, b, dy=dy)
    assert relative_error(y, ref[0]) <= TOLERANCE[F32]  # fp32 arithmetic, fp32 output: no 16-bit rounding
    for name, got, expected in zip(("dx", "dweight", "dbias"), (x_leaf.grad, w_leaf.grad, b_leaf.grad), ref[1:4]):
        assert relative_error(got, expected) <= TOLERANCE[got.dtype], name


def test_keep_input_dtype_opts_out(device, cpu_autocast_runs_in_fp32):
    x = make_input((2, 4, 3), BF16, device)
    norm = gn_triton.GroupNorm(2, 4, device=device)
    converted = gn_triton.convert_model(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), keep_input_dtype=True)
    with torch.autocast(device, dtype=BF16):
        assert gn_triton.group_norm(x, 2).dtype == F32
        assert gn_triton.group_norm(x, 2, keep_input_dtype=True).dtype == BF16
        assert norm(x).dtype == F32
        norm.keep_input_dtype = True
        assert norm(x).dtype == BF16 and "keep_input_dtype=True" in repr(norm)
        assert converted(x).dtype == BF16
    gn_triton.revert_model(converted)
    assert type(converted[0]) is torch.nn.GroupNorm and "keep_input_dtype" not in vars(converted[0])


def test_compiled_module_follows_the_rule(device, cpu_autocast_runs_in_fp32):
    """A converted module inside torch.compile (the op, traced by AOTAutograd) gives fp32 too."""
    torch.compiler.reset()
    x = make_input((2, 4, 3), BF16, device).requires_grad_()
    norm = gn_triton.GroupNorm(2, 4, device=device)
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    with torch.autocast(device, dtype=BF16):
        y = compiled(x)
    assert y.dtype == F32
    y.sum().backward()
    assert x.grad.dtype == BF16
    assert relative_error(y, reference(x.detach(), 2, norm.weight.detach(), norm.bias.detach())[0]) <= 2e-5


@pytest.mark.gpu
def test_cuda_autocast_matches_torch(device):
    """On a GPU, with torch's real CUDA autocast: fp32 like F.group_norm, from the bf16 input with no
    fp32 copy of it (peak memory: the fp32 output and small buffers), and the opt-out."""
    x = make_input((4, 64, 32, 32), BF16, device, offset=1.0)
    w, b = make_params(64, F32, device)
    with torch.autocast("cuda", dtype=BF16):
        expected = F.group_norm(x, 32, w, b)
        gn_triton.group_norm(x, 32, w, b)  # warm-up: compile and tune outside the count
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y = gn_triton.group_norm(x, 32, w, b)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        kept = gn_triton.group_norm(x, 32, w, b, keep_input_dtype=True)
    assert expected.dtype == y.dtype == F32 and kept.dtype == BF16
    assert extra <= x.numel() * 4 + (4 << 20), extra
    assert relative_error(y, reference(x, 32, w, b)[0]) <= TOLERANCE[F32]
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
