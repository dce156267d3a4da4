"""The drop-in API: module, signatures, bad input, empty input, skipped gradients, custom ops,
torch.compile, the CPU fallback and the autotuner's cache."""

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import ACTIVATIONS
from gn_testing import (
    TOLERANCE,
    assert_close,
    assert_matches_reference,
    error,
    forward_backward,
    make_input,
    make_modulation,
    make_params,
    reference,
    torch_group_norm,
)

import gn_triton
from gn_triton import _checks, _launch, _ops, _tuning


def test_signatures_match_torch():
    """torch's parameters, in torch's order, with torch's defaults; ours adds keyword-only extensions
    (activation; scale, shift and keep_input_dtype on the function), defaulting to None (False)."""
    extensions = {"activation": None, "scale": None, "shift": None, "keep_input_dtype": False}

    def without_activation(fn):
        params = inspect.signature(fn).parameters
        for name in extensions.keys() & params.keys():
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is extensions[name]
        assert "activation" in params
        return [(p.name, p.kind, p.default) for p in params.values() if p.name not in extensions]

    def of(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert without_activation(gn_triton.group_norm) == of(F.group_norm)
    ours = without_activation(gn_triton.GroupNorm.__init__)
    if "bias" not in inspect.signature(torch.nn.GroupNorm.__init__).parameters:
        # A torch older than nn.GroupNorm's `bias` keyword: ours still takes it, as newer torch does.
        assert ours[-1] == ("bias", inspect.Parameter.KEYWORD_ONLY, True)
        ours = ours[:-1]
    assert ours == of(torch.nn.GroupNorm.__init__)


def test_module_is_a_drop_in(device):
    torch_gn = torch.nn.GroupNorm(4, 8, eps=1e-4, device=device)
    with torch.no_grad():
        torch_gn.weight.normal_()
        torch_gn.bias.normal_()
    ours = gn_triton.GroupNorm(4, 8, eps=1e-4, device=device)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert repr(ours) == repr(torch_gn)
    ours.load_state_dict(torch_gn.state_dict())
    assert ours.state_dict().keys() == torch_gn.state_dict().keys()
    back = torch.nn.GroupNorm(4, 8, eps=1e-4, device=device)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, torch_gn.weight)
    x = make_input((2, 8, 3, 3), torch.float32, device)
    expected = reference(x, 4, torch_gn.weight.detach(), torch_gn.bias.detach(), torch.ones_like(x), eps=1e-4)[0]
    assert_close(ours(x), expected, TOLERANCE[torch.float32])
    plain = gn_triton.GroupNorm(2, 6, affine=False, device=device)
    assert plain.weight is None and plain.bias is None
    x = make_input((2, 6, 4), device=device)
    assert_close(plain(x), reference(x, 2)[0], TOLERANCE[torch.float32])
    nobias = gn_triton.GroupNorm(2, 6, bias=False, device=device)
    assert nobias.bias is None and nobias.weight is not None


def test_module_trains(device):
    """A GroupNorm inside a small model gets the same parameter gradients as torch's module."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 8, 3, device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    grads = []
    for cls in (torch.nn.GroupNorm, gn_triton.GroupNorm):
        norm = cls(4, 8, device=device, dtype=torch.float64)
        conv.zero_grad()
        norm(conv(x)).square().sum().backward()
        grads.append((conv.weight.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def tensor(*size, dtype=torch.float32, device=None):
    """A builder of a tensor of that size on the test's device (or on `device`)."""
    fill = torch.randn if dtype.is_floating_point else torch.ones
    return lambda test_device: fill(size, dtype=dtype, device=device or test_device)


# (name, arguments replacing input=(2, 4, 3) and num_groups=2, exception, words the message must contain).
# The exception is torch's own for the same input (test_bad_input checks it against F.group_norm),
# except where TORCH_DIFFERS says otherwise, and for the extensions, which torch does not have.
BAD_INPUTS = [
    ("C not divisible", dict(input=tensor(2, 5, 3)), RuntimeError, ["divisible", "num_groups=2", "(2, 5, 3)"]),
    ("num_groups 0", dict(num_groups=0), ZeroDivisionError, ["num_groups", "0"]),
    ("num_groups negative", dict(num_groups=-2), RuntimeError, ["num_groups", "-2"]),
    ("num_groups float", dict(num_groups=2.0), TypeError, ["num_groups", "float"]),
    ("num_groups bool", dict(num_groups=True), TypeError, ["num_groups", "bool"]),
    ("num_groups None", dict(num_groups=None), TypeError, ["num_groups", "NoneType"]),
    ("eps a string", dict(eps="1e-5"), TypeError, ["eps", "str"]),
    ("1-D input", dict(input=tensor(4)), RuntimeError, ["2 dimensions", "(4,)"]),
    ("0-D input", dict(input=tensor()), RuntimeError, ["2 dimensions", "()"]),
    ("one value per group", dict(input=tensor(1, 4, 1), num_groups=4), ValueError, ["more than 1 value", "[1, 4, 1]"]),
    ("integer input", dict(input=tensor(2, 4, 3, dtype=torch.int64)), NotImplementedError, ["floating", "torch.int64"]),
    ("bool input", dict(input=tensor(2, 4, 3, dtype=torch.bool)), NotImplementedError, ["floating", "torch.bool"]),
    ("input not a tensor", dict(input=lambda device: [1.0, 2.0]), TypeError, ["input", "list"]),
    ("weight shape", dict(weight=tensor(3)), RuntimeError, ["weight", "(3,)", "4"]),
    ("bias shape", dict(bias=tensor(4, 1)), RuntimeError, ["bias", "(4, 1)"]),
    ("integer weight", dict(weight=tensor(4, dtype=torch.int32)), RuntimeError, ["weight", "torch.int32"]),
    ("integer bias", dict(bias=tensor(4, dtype=torch.int64)), RuntimeError, ["bias", "torch.int64"]),
    ("weight not a tensor", dict(weight=lambda device: [1.0] * 4), TypeError, ["weight", "list"]),
    ("weight on meta", dict(weight=tensor(4, device="meta")), RuntimeError, ["same device", "weight", "meta"]),
    ("scale shape", dict(scale=tensor(2, 3)), RuntimeError, ["scale", "(2, 4)", "(2, 3)"]),
    ("shift shape", dict(shift=tensor(4)), RuntimeError, ["shift", "(4,)"]),
    ("integer scale", dict(scale=tensor(2, 4, dtype=torch.int64)), RuntimeError, ["scale", "torch.int64"]),
    ("shift on meta", dict(shift=tensor(2, 4, device="meta")), RuntimeError, ["same device", "shift", "meta"]),
    ("unknown activation", dict(activation="relu"), ValueError, ["unknown activation='relu'"]),
    # Combined bad inputs: torch's order of checks decides the type (its Python checks, then argument
    # types, then its C++ checks).
    ("integer input, one value per group", dict(input=tensor(1, 2, 1, dtype=torch.int64)), ValueError, ["[1, 2, 1]"]),
    ("integer input, C not divisible", dict(input=tensor(2, 3, 4, dtype=torch.int64)), RuntimeError, ["divisible"]),
    ("one value per group, C not divisible", dict(input=tensor(2, 1)), ValueError, ["more than 1 value"]),
    ("integer input, num_groups 0", dict(input=tensor(2, 4, dtype=torch.int64), num_groups=0), ZeroDivisionError,
     ["num_groups"]),
    ("integer input, num_groups negative", dict(input=tensor(2, 4, 3, dtype=torch.int64), num_groups=-2),
     RuntimeError, ["num_groups", "-2"]),
    ("integer input, weight shape", dict(input=tensor(2, 4, 3, dtype=torch.int64), weight=tensor(5)), RuntimeError,
     ["weight", "(5,)"]),
    ("num_groups float, one value per group", dict(input=tensor(1, 2), num_groups=2.0), ValueError,
     ["more than 1 value"]),
    ("eps a string, one value per group", dict(input=tensor(1, 2, 1), eps="a"), ValueError, ["more than 1 value"]),
    ("weight a list, C not divisible", dict(input=tensor(2, 3, 3), weight=lambda device: [1.0] * 3), TypeError,
     ["weight", "list"]),
    ("num_groups negative, C not divisible", dict(input=tensor(2, 4, 3), num_groups=-3), RuntimeError,
     ["num_groups", "-3"]),
    ("bool input, one value per group", dict(input=tensor(1, 2, 1, dtype=torch.bool)), ValueError, ["[1, 2, 1]"]),
    ("num_groups a 0-d float tensor", dict(num_groups=torch.tensor(2.0)), TypeError, ["num_groups", "Tensor"]),
]  # fmt: skip
# Where torch raises another type (docs/drop-in.md lists these): torch fails on a list input with an
# AttributeError from inside its Python wrapper.
TORCH_DIFFERS = {"input not a tensor": AttributeError}


# The CPU fallback runs torch's group_norm, which checks torch's own arguments itself; the arguments
# only gn_triton has (scale, shift, activation) must be checked before it, or torch's ops that apply
# them would fail with other errors (a reshape's, a KeyError). Those run on both paths; the others are
# checked once, before the path is chosen (the same code on both).
ONLY_GN_TRITON = {b[0] for b in BAD_INPUTS if {"scale", "shift", "activation"} & b[1].keys()}
BAD_INPUT_RUNS = [pytest.param(*b, False, id=b[0]) for b in BAD_INPUTS] + [
    pytest.param(*b, True, id=f"{b[0]}, torch fallback") for b in BAD_INPUTS if b[0] in ONLY_GN_TRITON
]


@pytest.mark.parametrize("name,args,exc,words,fallback", BAD_INPUT_RUNS)
def test_bad_input(name, args, exc, words, fallback, device, monkeypatch):
    """Bad arguments raise torch's exception type, naming the argument; gn_triton's own arguments
    also where torch's own kernel runs (the CPU fallback)."""
    kwargs = {"input": tensor(2, 4, 3), "num_groups": 2, **args}
    kwargs = {k: v(device) if callable(v) else v for k, v in kwargs.items()}
    if not {"scale", "shift", "activation"} & kwargs.keys():
        with pytest.raises(Exception) as theirs:
            F.group_norm(**kwargs)
        assert theirs.type is TORCH_DIFFERS.get(name, exc), f"torch raises {theirs.type.__name__}: {theirs.value}"
    if fallback:
        monkeypatch.setattr(_checks, "INTERPRET", False)
    with pytest.raises(exc) as info:
        gn_triton.group_norm(**kwargs)
    assert info.type is exc
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_backend_for_names_the_path_a_call_runs(device, monkeypatch):
    x = torch.randn(2, 4, 3, device=device)
    kernels = "kernels" if device == "cuda" else "interpreter"
    assert gn_triton.backend_for(x) == kernels
    assert gn_triton.backend_for(x.to(torch.float8_e4m3fn)) == "torch"  # a dtype the kernels do not take
    assert gn_triton.backend_for(torch.randn(2, 4, 3, device="meta")) == "torch"
    monkeypatch.setattr(_checks, "INTERPRET", False)
    assert gn_triton.backend_for(torch.randn(2, 4, 3)) == "torch"
    assert gn_triton.backend_for(x) == ("kernels" if device == "cuda" else "torch")
    if device == "cpu":  # the path backend_for names is the one that runs: torch's kernel, not ours
        launched = []
        monkeypatch.setattr(_launch, "gn_fwd", lambda *args: launched.append(args))
        gn_triton.group_norm(x, 2)
        assert launched == []


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)], ids=["N=0", "empty spatial", "N=0 (N, C)"])
def test_empty_input(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    w, b = (p.requires_grad_() for p in make_params(4, torch.float32, device))
    y = gn_triton.group_norm(x, 2, w, b)
    assert y.shape == F.group_norm(x, 2, w, b).shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_only_requested_gradients_are_computed(device, monkeypatch):
    """A frozen input gets no dx launch; frozen parameters get no dweight/dbias launch."""
    launched = []
    for name in ("_gn_bwd_split_dx_kernel", "_gn_bwd_dparams_kernel", "_gn_bwd_partial_sums_kernel"):
        kernel = _launch.KERNELS[name]

        class Spy:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setitem(_launch.KERNELS, name, Spy(name, kernel))
    x = make_input((2, 4, 4, 4), torch.float32, device)
    w, b = make_params(4, torch.float32, device)
    with _tuning.override_plan(split=2, block_s=8):
        gn_triton.group_norm(x, 2, w.requires_grad_(), b).sum().backward()  # x frozen, b frozen
        assert "_gn_bwd_split_dx_kernel" not in launched and "_gn_bwd_dparams_kernel" in launched
        launched.clear()
        w.requires_grad_(False)
        x.requires_grad_()
        gn_triton.group_norm(x, 2, w, b).sum().backward()
        assert "_gn_bwd_split_dx_kernel" in launched and "_gn_bwd_dparams_kernel" not in launched
    assert w.grad is not None and b.grad is None


def test_bwd_op_returns_empty_for_skipped_grads(device):
    x = make_input((2, 4, 3), torch.float32, device)
    w, b = make_params(4, torch.float32, device)
    y, mean, mean_lo, rstd = _ops.group_norm_fwd(x, w, b, 2, 1e-5)
    dx, dw, db, dscale, dshift = _ops.group_norm_bwd(
        torch.randn_like(y), x, w, b, mean, mean_lo, rstd, 2, [False, True, False, True, True]
    )
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape
    assert dscale.numel() == 0 and dshift.numel() == 0  # asked for, but there is no scale or shift


def test_saved_statistics(device):
    """mean/rstd are (N, G) fp32 and match the float64 statistics; mean + mean_lo is more exact."""
    x = make_input((2, 4, 8, 8), torch.float32, device, offset=1e4)
    _, mean, mean_lo, rstd = _ops.group_norm_fwd(x, None, None, 2, 1e-5)
    rows = x.double().reshape(2, 2, -1)
    true_mean = rows.mean(-1)
    assert mean.shape == (2, 2) and mean.dtype == torch.float32
    assert torch.equal(mean, true_mean.float())  # the correctly rounded mean
    assert ((mean.double() + mean_lo.double()) - true_mean).abs().max() < 1e-6
    assert torch.allclose(rstd.double(), 1 / (rows.var(-1, unbiased=False) + 1e-5).sqrt(), rtol=1e-6)


# (name, input layout, weight given, activation, scale and shift given, out_dtype: None or fp32 of bf16 input)
OP_CALLS = [
    ("plain", "contiguous", True, None, False, None),
    ("channels_last, no weight", "channels_last", False, None, False, None),
    ("gelu", "contiguous", True, "gelu", False, None),
    ("silu, scale and shift", "contiguous", True, "silu", True, None),
    ("bf16 input, fp32 output (autocast)", "contiguous", True, "silu", True, torch.float32),
]


@pytest.mark.parametrize("name,layout,weight,activation,modulated,out_dtype", OP_CALLS, ids=[c[0] for c in OP_CALLS])
def test_opcheck(name, layout, weight, activation, modulated, out_dtype, device):
    """torch.library.opcheck of the forward and backward ops, called as autograd.py calls them
    (arguments left at their defaults are left out)."""
    dtype = torch.float32 if out_dtype is None else torch.bfloat16
    x = make_input((2, 4, 3, 3), dtype, device, layout=layout)
    w, b = make_params(4, torch.float32, device, weight=weight)
    scale, shift = make_modulation(2, 4, torch.float32, device) if modulated else (None, None)

    def call(*args, defaults):  # the trailing arguments that equal their defaults dropped
        while len(args) > defaults and args[-1] is None:
            args = args[:-1]
        return args

    fwd_args = call(x, w, b, 2, 1e-5, activation, scale, shift, out_dtype, defaults=5)
    torch.library.opcheck(_ops.group_norm_fwd, fwd_args)
    y, mean, mean_lo, rstd = _ops.group_norm_fwd(*fwd_args)
    assert y.dtype == (out_dtype or x.dtype)
    mask = [True, weight, True, modulated, modulated]
    bwd_args = call(torch.randn_like(y), x, w, b, mean, mean_lo, rstd, 2, mask, activation, scale, shift, defaults=9)
    torch.library.opcheck(_ops.group_norm_bwd, bwd_args)


class ScaleShiftBlock(torch.nn.Module):
    """conv -> GroupNorm+SiLU modulated per sample by an embedding (the diffusion ResNet block's norm)."""

    def __init__(self, device):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, device=device)
        self.norm = gn_triton.GroupNorm(4, 8, device=device, activation="silu")
        self.emb = torch.nn.Linear(5, 16, device=device)

    def forward(self, x, t):
        scale, shift = self.emb(t).chunk(2, dim=1)
        return self.norm(self.conv(x), scale=scale, shift=shift)


@pytest.mark.parametrize("block", ["conv+GroupNorm", "conv+GroupNorm+SiLU, scale-shift"])
def test_torch_compile_fullgraph(block, device):
    """Forward and backward compile with no graph break (fullgraph=True) and match eager."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    if block == "conv+GroupNorm":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, device=device), gn_triton.GroupNorm(4, 8, device=device))
        inputs = (torch.randn(2, 3, 6, 6, device=device),)
    else:
        model = ScaleShiftBlock(device)
        inputs = (torch.randn(2, 3, 6, 6, device=device), torch.randn(2, 5, device=device))
    eager_y = model(*inputs)
    eager_y.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(*inputs)
    y.square().sum().backward()
    assert torch.allclose(y, eager_y, atol=1e-5)
    for g, e in zip((p.grad for p in model.parameters()), eager_grads):
        assert torch.allclose(g, e, atol=1e-4)


@pytest.mark.gpu
def test_channels_last_allocates_only_outputs(device):
    """On a GPU: a channels_last forward+backward allocates y and dx, nothing activation-sized more
    (no hidden transpose or contiguous copy)."""
    x = torch.randn(4, 64, 64, 64, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    w, b = make_params(64, torch.float16, device)
    gn_triton.group_norm(x, 32, w, b).backward(dy)  # warm-up: compile and tune outside the count
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gn_triton.group_norm(x, 32, w, b).backward(dy)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 2 * x.numel() * x.element_size() + (4 << 20), extra


@pytest.mark.parametrize("epilogue", ["none", *ACTIVATIONS, "gelu, scale and shift"])
def test_cpu_falls_back_to_torch_without_interpreter(epilogue, monkeypatch):
    """Outside the interpreter a CPU tensor runs torch's own kernel and torch's ops for the
    epilogue, so models still run on CPU."""
    monkeypatch.setattr(_checks, "INTERPRET", False)
    x = torch.randn(2, 4, 3, 3)
    w, b = make_params(4)
    activation = None if epilogue == "none" else epilogue.split(",")[0]
    scale, shift = make_modulation(2, 4) if "scale" in epilogue else (None, None)
    ours = gn_triton.group_norm(x, 2, w, b, activation=activation, scale=scale, shift=shift)
    assert gn_triton.backend_for(x) == "torch"
    # torch's own ops, written in gn_testing (not gn_triton's fallback code): the same ops, so bitwise
    expected = torch_group_norm(x, 2, w, b, activation=activation, scale=scale, shift=shift)
    assert torch.equal(ours, expected)
    ref = reference(x, 2, w, b, activation=activation, scale=scale, shift=shift)[0]
    assert error(ours, ref) <= 1e-6  # and fp32's level against the float64 reference


def test_autotune_key_buckets_and_caches(monkeypatch):
    """Tuning times each candidate once per key; a batch size in the same bucket reuses the plan."""
    monkeypatch.setattr(_tuning, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(_tuning, "device_info", lambda device: (132, 50 << 20))
    monkeypatch.setattr(_tuning, "_tuned", {})
    timed = []

    def fake_bench(fn, **kwargs):
        timed.append(fn)
        return float(len(timed))  # the first candidate (the heuristic plan) wins

    monkeypatch.setattr(_tuning.triton.testing, "do_bench", fake_bench)
    cuda = torch.device("cuda")
    launch = lambda plan: None
    p5 = _tuning.Problem(5, 320, 4096, 32, torch.float16, False, True, True)
    p7 = _tuning.Problem(7, 320, 4096, 32, torch.float16, False, True, True)
    plan5 = _tuning.choose_plan("fwd", p5, cuda, launch)
    n_candidates = len(timed)
    assert n_candidates == len(_tuning.candidate_plans("fwd", p5, cuda)) > 1
    assert plan5 == _tuning.heuristic_plan("fwd", p5, cuda)
    assert _tuning.choose_plan("fwd", p7, cuda, launch) == plan5.fit(p7)  # same bucket (8): no timing
    assert len(timed) == n_candidates
    _tuning.choose_plan("fwd", p5, cuda, launch)
    assert len(timed) == n_candidates
    _tuning.choose_plan("bwd", p5, cuda, launch)
    assert len(timed) > n_candidates


def test_batch1_is_split_across_the_gpu():
    """Batch 1 with G=32 must not run on 32 programs: the planner splits rows over the SMs."""
    p = _tuning.Problem(1, 320, 64 * 64, 32, torch.float16, False, True, True)
    info = _tuning.device_info
    try:
        _tuning.device_info = lambda device: (132, 50 << 20)
        for direction in ("fwd", "bwd"):
            plan = _tuning.heuristic_plan(direction, p, torch.device("cuda"))
            assert plan.split > 1 and plan.blocks(p) * plan.span(p.S)[1] * plan.chunk(p)[1] >= 2 * 132
        big = _tuning.Problem(64, 320, 64 * 64, 32, torch.float16, False, True, True)
        assert _tuning.heuristic_plan("fwd", big, torch.device("cuda")).split == 1
    finally:
        _tuning.device_info = info


# (name, input dtype, weight, bias, input shape): where torch's CPU kernel differs from gn_triton's.
FALLBACK_FIXES = [
    ("bias without weight", torch.float32, None, torch.float32, (2, 4, 3)),
    ("fp32 input, bf16 weight", torch.float32, torch.bfloat16, torch.bfloat16, (2, 4, 3)),
    ("bf16 input, fp16 weight", torch.bfloat16, torch.float16, torch.float32, (2, 4, 3)),
    ("fp64 input, fp32 weight", torch.float64, torch.float32, torch.float32, (2, 4, 3)),
    ("empty spatial", torch.float32, torch.float32, torch.float32, (2, 4, 0, 3)),
]


@pytest.mark.parametrize("name,x_dtype,w_dtype,b_dtype,shape", FALLBACK_FIXES, ids=[f[0] for f in FALLBACK_FIXES])
def test_cpu_fallback_keeps_gn_triton_behaviour(name, x_dtype, w_dtype, b_dtype, shape, monkeypatch):
    """Without the interpreter the CPU runs torch's kernel, but as gn_triton's kernels behave: a bias
    without a weight differentiates, parameters of any floating dtype are taken, empty input gives
    zero parameter gradients (torch's kernel: a crash, "mixed dtype", NaN)."""
    monkeypatch.setattr(_checks, "INTERPRET", False)
    x = make_input(shape, x_dtype)
    w = None if w_dtype is None else make_params(4, w_dtype)[0]
    b = make_params(4, b_dtype)[1]
    if x.numel():
        assert_matches_reference(x, 2, w, b)  # every output and gradient, in its tensor's dtype
        return
    y, dx, dw, db, _, _ = forward_backward(gn_triton.group_norm, x, 2, w, b)
    assert y.shape == dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize(
    "num_groups,eps",
    [(np.int64(2), 1e-5), (torch.tensor(2), 1e-5), (2, np.float32(1e-3)), (2, torch.tensor(1e-3)), (2, 1)],
    ids=["np.int64 groups", "0-d tensor groups", "np.float32 eps", "0-d tensor eps", "int eps"],
)
def test_number_types_torch_takes(num_groups, eps, device):
    """numpy numbers and 0-d tensors where torch's group_norm takes them (bad ones: test_bad_input)."""
    x, (w, b) = make_input((2, 4, 3), device=device, offset=3.0), make_params(4, device=device)
    expected = F.group_norm(x, num_groups, w, b, eps)
    assert_close(gn_triton.group_norm(x, num_groups, w, b, eps), expected, TOLERANCE[torch.float32])


def test_backend_for_refuses_what_is_not_a_tensor():
    for bad in ([1.0], None, 3):
        with pytest.raises(TypeError, match="input must be a Tensor"):
            gn_triton.backend_for(bad)


ROUTES = ["eager", "op", "torch fallback"]


def routed(route: str, monkeypatch):
    """gn_triton's function of (x, num_groups, w, b, eps, activation, scale, shift) on one route: the eager
    route (interpreter or kernels), the forward op called directly (as a compiled graph calls it:
    differentiated by the backward registered on it) or the CPU fallback (torch's kernel)."""
    if route == "torch fallback":
        monkeypatch.setattr(_checks, "INTERPRET", False)
    if route == "op":
        return lambda x, G, w, b, eps, act, s, t: torch.ops.gn_triton.group_norm_fwd(x, w, b, G, eps, act, s, t)[0]
    return lambda x, G, w, b, eps, act, s, t: gn_triton.group_norm(x, G, w, b, eps, activation=act, scale=s, shift=t)


@pytest.mark.parametrize("epilogue", ["plain", "silu, scale and shift", "gelu"])
@pytest.mark.parametrize("route", ROUTES)
def test_gradient_penalty_equals_torch(route, epilogue, device, monkeypatch):
    """Double backward (create_graph=True): the gradient of ||dx||^2 with respect to x, weight, bias,
    scale and shift equals torch's in float64."""
    if route == "torch fallback" and device == "cuda":
        pytest.skip("the fallback is a CPU path")
    activation = None if epilogue == "plain" else epilogue.split(",")[0]
    x = make_input((2, 4, 3, 2), torch.float64, device, offset=2.0)
    w, b = make_params(4, torch.float64, device)
    scale, shift = make_modulation(2, 4, torch.float64, device) if "scale" in epilogue else (None, None)
    dy = torch.randn_like(x)
    ours = routed(route, monkeypatch)

    def penalty(fn):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b, scale, shift)]
        xl, wl, bl, sl, tl = leaves
        y = fn(xl, 2, wl, bl, 1e-5, activation, sl, tl)
        (dx,) = torch.autograd.grad(y, xl, dy, create_graph=True)
        return torch.autograd.grad((dx**2).sum(), [t for t in leaves if t is not None], materialize_grads=True)

    theirs = lambda x, G, w, b, eps, act, s, t: torch_group_norm(x, G, w, b, eps, act, s, t)  # noqa: E731
    for got, want in zip(penalty(ours), penalty(theirs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e39, float("inf")])
@pytest.mark.parametrize("route", ["eager", "op", "eager override", "torch fallback"])
def test_eps_beyond_fp32_range(route, eps, dtype, device, monkeypatch):
    """eps past fp32's largest value: rstd is (about) 0 and y the bias, as torch gives, outputs and
    gradients; no NaN."""
    if route == "torch fallback" and device == "cuda":
        pytest.skip("the fallback is a CPU path")
    x = make_input((2, 4, 3), dtype, device, offset=2.0).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(4, dtype, device))
    dy = torch.randn_like(x)
    # torch's CPU kernel on bf16 computes in fp32 too: the reference takes the fp32 copies
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    expected_y = F.group_norm(x.to(ref_dtype), 2, w.to(ref_dtype), b.to(ref_dtype), eps)
    expected = (expected_y, *torch.autograd.grad(expected_y, (x, w, b), dy.to(ref_dtype)))
    if route == "eager override":
        with gn_triton.enable_eager_override():
            y = F.group_norm(x, 2, w, b, eps)
    else:
        y = routed(route, monkeypatch)(x, 2, w, b, eps, None, None, None)
    got = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for name, g, e in zip(("y", "dx", "dweight", "dbias"), got, expected):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.to(ref_dtype), e.to(dtype).to(ref_dtype), rtol=1e-2, atol=1e-6, msg=name)


def test_meta_tensors_propagate_shape_and_dtype():
    """Shape and dtype propagation on the meta device, as torch's group_norm (function, module and a
    converted model), 16-bit included (the autocast rule asks the device's autocast state)."""
    for dtype in (torch.float16, torch.float32):
        x = torch.empty(2, 4, 3, 3, device="meta", dtype=dtype)
        expected = F.group_norm(x, 2)
        for y in (
            gn_triton.group_norm(x, 2),
            gn_triton.group_norm(x, 2, activation="silu", keep_input_dtype=True),
            gn_triton.GroupNorm(2, 4, device="meta", dtype=dtype)(x),
            gn_triton.convert_model(torch.nn.Sequential(torch.nn.GroupNorm(2, 4, device="meta", dtype=dtype)))(x),
        ):
            assert (y.device.type, y.shape, y.dtype) == ("meta", expected.shape, expected.dtype)


@pytest.mark.parametrize("route", ["eager", "op", "ops route (torch function mode)", "torch fallback"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no weight"])
def test_bias_updated_in_place_before_backward(route, weight, device, monkeypatch):
    """The backward never reads the bias without an activation or a scale: an in-place update between
    forward and backward is allowed, as with torch, and the gradients are torch's."""
    if route == "torch fallback" and device == "cuda":
        pytest.skip("the fallback is a CPU path")
    x = make_input((2, 4, 3), device=device, offset=2.0).requires_grad_()
    w, b = (p.requires_grad_() for p in make_params(4, device=device))
    w = w if weight else None
    dy = torch.randn_like(x)
    inputs = [t for t in (x, w, b) if t is not None]

    def step(fn):
        y = fn(x, 2, w, b, 1e-5, None, None, None)
        with torch.no_grad():
            b.add_(1.0)
        return torch.autograd.grad(y, inputs, dy)

    # torch's CPU kernel cannot differentiate a bias without a weight: torch's reference gets ones
    ones = torch.ones(4, device=device)
    expected = step(lambda x, G, w, b, eps, *_: F.group_norm(x, G, ones if w is None else w, b, eps))
    ours = routed("eager" if route.startswith("ops") else route, monkeypatch)
    if route.startswith("ops"):
        with Passthrough():
            got = step(ours)
    else:
        got = step(ours)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, TOLERANCE[torch.float32])


class Passthrough(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: calls under it take the ops' route."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_empty_input_without_affine_is_a_new_tensor(monkeypatch):
    """The CPU fallback returns a new tensor for empty input, as torch does, never the input itself."""
    monkeypatch.setattr(_checks, "INTERPRET", False)
    x = torch.randn(0, 4, 3)
    assert F.group_norm(x, 2) is not x
    assert gn_triton.group_norm(x, 2) is not x


def converted_block(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU()).to(device)
    return model, gn_triton.convert_model(copy.deepcopy(model))


def test_fx_symbolic_trace_of_a_converted_model(device):
    """torch.fx traces a converted model as it traces torch's: gn_triton.group_norm is a node of the
    graph, and the traced module computes what the model does."""
    model, converted = converted_block(device)
    x = make_input((2, 4, 3, 3), device=device, offset=1.0)
    traced = torch.fx.symbolic_trace(converted)
    assert gn_triton.group_norm in [node.target for node in traced.graph.nodes]
    assert_close(traced(x), model(x), TOLERANCE[torch.float32])


def test_torch_function_modes_see_group_norm(device):
    """A __torch_function__ mode sees gn_triton.group_norm called (as it sees torch's F.group_norm) and
    the result is torch's."""
    model, converted = converted_block(device)
    x = make_input((2, 4, 3, 3), device=device, offset=1.0)

    class Recording(Passthrough):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    for module, norm in ((model, F.group_norm), (converted, gn_triton.group_norm)):
        seen = []
        with Recording():
            y = module(x)
        assert norm in seen
    assert_close(y, model(x), TOLERANCE[torch.float32])


def test_jit_script_of_a_converted_model_says_why_it_cannot():
    """TorchScript cannot compile gn_triton's Python forward: a RuntimeError that says so and what to
    use instead (torch's own model scripts)."""
    model, converted = converted_block("cpu")
    torch.jit.script(model)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile gn_triton.GroupNorm.*torch.compile"):
        torch.jit.script(converted)
