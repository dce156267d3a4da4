"""The opt-in torch.compile pass (gn_triton.enable_compile_fusion): unconverted models compiled with
it call gn_triton's op with the epilogue fused, and match eager float64 in outputs and every gradient.

Inductor compiles are slow here (C++ codegen, kernels in Triton's interpreter), so only the tests
about generated code compile with Inductor; the pattern cases run the rewritten Dynamo graph eagerly
through a small backend (the graph Inductor would receive, differentiated by the same autograd)."""

from __future__ import annotations

import contextlib
import operator
import re
from unittest import mock

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import config as inductor_config
from torch._inductor.graph import GraphLowering

import gn_triton
from gn_triton.compile_fusion import fuse_group_norms

OP = "torch.ops.gn_triton.group_norm_fwd.default("
# Inductor names each generated kernel after the ATen ops it fuses (cpp_fused_..._silu_1, triton_..._silu_0).
SILU_KERNEL = re.compile(r"fused_\w*silu")
TOL = 1e-9  # float64 against float64: the order of sums differs (fp64 kernels take eps as an fp32 pair, to ~2^-48)
EPS = 2.0**-16  # the pattern cases' eps: exact in every dtype


@pytest.fixture(autouse=True)
def clean_state():
    """Each test starts and ends with the fusion off and nothing compiled."""
    gn_triton.disable_compile_fusion()
    torch.compiler.reset()
    yield
    gn_triton.disable_compile_fusion()
    torch.compiler.reset()


def run(model, inputs):
    """Forward and backward of a loss weighting every output differently: (output, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}


def assert_matches(got, expected):
    (out, grads), (e_out, e_grads) = got, expected
    assert (out - e_out).abs().max() <= TOL * e_out.abs().max()
    assert grads.keys() == e_grads.keys()
    for name, g in grads.items():
        e = e_grads[name]
        if e is None:  # a parameter the form does not use
            assert g is None, name
        else:
            assert (g - e).abs().max() <= TOL * e.abs().max().clamp_min(1e-3), name


class Modulated(torch.nn.Module):
    """conv -> GroupNorm -> form(h, scale, shift) -> conv, with scale and shift the (N, C, 1, 1)
    halves of an embedding's projection, as diffusers' ResnetBlock2D makes them."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8, eps=EPS)
        self.emb = torch.nn.Linear(5, 16)
        self.out = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x, t):
        scale, shift = self.emb(t)[:, :, None, None].chunk(2, dim=1)
        return self.out(self.form(self.norm(self.conv(x)), scale, shift))


def modulated(form, device):
    torch.manual_seed(0)
    model = Modulated(form).to(device, torch.float64)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    return model


def modulated_inputs(batch: int, device):
    return torch.randn(batch, 3, 6, 6, dtype=torch.float64, device=device), torch.randn(
        batch, 5, dtype=torch.float64, device=device
    )


@contextlib.contextmanager
def generated_code():
    """The code Inductor generates inside the block, forward and backward (what
    torch._inductor.utils.run_and_get_code collects, without its torch._dynamo.reset(), which would
    forget the automatic dynamic shapes); caches off, so every graph is generated here."""
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        with inductor_config.patch(force_disable_caches=True):
            yield codes


def compile_and_run(model, inputs):
    """Output and gradients of `model` compiled by Inductor (fullgraph), and the generated code."""
    with generated_code() as codes:
        result = run(torch.compile(model, fullgraph=True), inputs)
    return result, "\n".join(codes)


def fused_code(model, inputs) -> str:
    """The code Inductor generates for `model` with the fusion pass on, once its output and gradients
    are checked against the eager model's."""
    expected = run(model, inputs)
    with gn_triton.enable_compile_fusion():
        result, code = compile_and_run(model, inputs)
    assert_matches(result, expected)
    return code


def fused_calls(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines() if OP in line]


def epilogue(call: str) -> tuple[str, bool, bool]:
    """(activation, scale passed, shift passed) of a generated op call, read from its top-level
    arguments (Inductor leaves out trailing ones equal to their defaults, None)."""
    inner, args, depth = call[call.index(OP) + len(OP) : call.rindex(")")], [""], 0
    for ch in inner:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            args.append("")
        else:
            args[-1] += ch
    activation, scale, shift = ([a.strip() for a in args] + ["None"] * 3)[5:8]
    return activation, scale != "None", shift != "None"


def sequential(device):
    torch.manual_seed(0)
    layers = (torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3))
    model = torch.nn.Sequential(*layers).to(device, torch.float64)
    return model, (torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device),)


# --- Inductor: the generated code -----------------------------------------------------------------


def test_unconverted_sequential_calls_gn_triton_with_silu_fused(device):
    model, inputs = sequential(device)
    code = fused_code(model, inputs)
    [call] = fused_calls(code)
    assert epilogue(call) == ("'silu'", False, False)
    assert "gn_triton.group_norm_bwd.default(" in code  # the backward is gn_triton's op
    assert not SILU_KERNEL.search(code)  # no separate SiLU kernel, forward or backward


def test_disabling_restores_inductors_own_lowering(device):
    model, inputs = sequential(device)
    gn_triton.enable_compile_fusion()
    gn_triton.disable_compile_fusion()
    with torch.no_grad(), generated_code() as codes:  # forward only: enough to see the lowering
        out = torch.compile(model, fullgraph=True)(*inputs)
    code = "\n".join(codes)
    assert OP not in code and "aten.native_group_norm" in code and SILU_KERNEL.search(code)
    expected = model(*inputs).detach()
    assert (out - expected).abs().max() <= TOL * expected.abs().max()


def test_scale_shift_fuses_and_a_dynamic_batch_does_not_recompile(device):
    """diffusers' h * (1 + scale) + shift, then SiLU: one op call taking scale, shift and SiLU.
    Batch 2 compiles, batch 3 recompiles with a dynamic batch (torch's automatic dynamic shapes),
    batch 4 reuses that graph: the pass fuses with symbolic sizes too and adds no guard."""
    model = modulated(lambda h, scale, shift: F.silu(h * (1 + scale) + shift), device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with gn_triton.enable_compile_fusion():
        for batch, compiles in ((2, 1), (3, 2), (4, 2)):
            inputs = modulated_inputs(batch, device)
            with generated_code() as codes:
                result = run(compiled, inputs)
            assert_matches(result, run(model, inputs))
            assert counter.frame_count == compiles
            if batch < 4:
                [call] = fused_calls("\n".join(codes))
                assert epilogue(call) == ("'silu'", True, True)
            else:
                assert not codes


def test_diffusers_unet_fuses_every_norm(device):
    """A small random-init UNet2DModel with scale-shift time embedding, compiled with the fusion:
    each ResnetBlock2D's norm1 + SiLU and norm2 + scale-shift + SiLU, and conv_norm_out + SiLU, are
    single op calls. (No mid block: it repeats the same blocks and costs compile time.) Timestep 0:
    diffusers computes the sinusoidal embedding in fp32, where Inductor's sin/cos differ from eager
    by ulps (as they do without the fusion); at 0 both are exact, so the comparison stays float64's."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16,),
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), mid_block_type=None, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
    ).to(device, torch.float64)  # fmt: skip
    inputs = (torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device), torch.tensor([0, 0], device=device))
    code = fused_code(model, inputs)
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
    calls = fused_calls(code)
    assert len(calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 2 * resnets + 1
    epilogues = sorted(epilogue(c) for c in calls)
    assert epilogues == [("'silu'", False, False)] * (resnets + 1) + [("'silu'", True, True)] * resnets  # norm2s
    assert "gn_triton.group_norm_bwd.default(" in code


# --- the pass on Dynamo graphs, run eagerly -------------------------------------------------------


def rewritten(model, inputs):
    """model compiled with a backend that applies the pass and runs the rewritten graph eagerly:
    (output and gradients, the rewritten graph)."""
    graphs = []

    def backend(gm, example_inputs):
        fuse_group_norms(gm.graph)
        gm.recompile()
        graphs.append(gm.graph)
        return gm

    result = run(torch.compile(model, backend=backend, fullgraph=True), inputs)
    [graph] = graphs
    return result, graph


def fused_node(graph):
    """(activation, scale passed, shift passed) of the graph's last gn_triton op call."""
    node = [n for n in graph.nodes if n.target is torch.ops.gn_triton.group_norm_fwd.default][-1]
    activation, scale, shift = node.args[5:8]
    return activation, scale is not None, shift is not None


def remaining(graph, *targets):
    return [n for n in graph.nodes if n.op in ("call_function", "call_method") and n.target in targets]


# form(h, scale, shift) -> (activation, scale passed, shift passed); each one folds wholly into the op.
FUSING = {
    "h*(1+s)+t, silu": (lambda h, s, t: F.silu(h * (1 + s) + t), ("silu", True, True)),
    "torch.mul/add, s+1, gelu": (lambda h, s, t: F.gelu(torch.add(torch.mul(h, s + 1), t)), ("gelu", True, True)),
    "h*(1+s)+t, gelu tanh": (lambda h, s, t: F.gelu(h * (1 + s) + t, approximate="tanh"), ("gelu_tanh", True, True)),
    "methods, operands swapped": (lambda h, s, t: t.add((1 + s).mul(h)), (None, True, True)),
    "shift only, SiLU module": (lambda h, s, t: torch.nn.SiLU()(h + t), ("silu", False, True)),
    "scale only": (lambda h, s, t: h * (1 + s), (None, True, False)),
    "inplace silu": (lambda h, s, t: F.silu(h, inplace=True), ("silu", False, False)),
    "second norm, no affine, G = C": (lambda h, s, t: F.silu(F.group_norm(h, 8, eps=EPS)), ("silu", False, False)),
}


# form -> what the op takes (activation, scale passed, shift passed); the rest stays as torch ops.
PARTIAL = {
    "normalised output has a second user": (lambda h, s, t: F.silu(h) + h, (None, False, False)),
    "scaled value has a second user": (lambda h, s, t: (lambda u: F.silu(u + t) * u)(h * (1 + s)), (None, True, False)),
    "shifted value has a second user": (lambda h, s, t: (lambda u: F.silu(u) * u)(h * (1 + s) + t), (None, True, True)),
    "shift before scale": (lambda h, s, t: F.silu((h + t) * (1 + s)), (None, False, True)),
    "per-channel, not per-sample": (lambda h, s, t: F.silu(h * (1 + s[:1])), (None, False, False)),
    "operand of another dtype": (lambda h, s, t: F.silu(h * (1 + s.float())), (None, False, False)),
    "scalar multiple": (lambda h, s, t: F.silu(h * 2), (None, False, False)),
    "general multiplier h*m+t: the multiply stays": (lambda h, s, t: F.silu(h * s + t), (None, False, False)),
}


@pytest.mark.parametrize("name", [*FUSING, *PARTIAL])
def test_forms_that_fuse_and_that_do_not(name, device):
    """FUSING: every epilogue op folds into the op. PARTIAL: GroupNorm itself still runs on gn_triton,
    what cannot fold (a second user, the wrong order or shape) stays a torch op."""
    form, fused = FUSING[name] if name in FUSING else PARTIAL[name]
    model = modulated(form, device)
    inputs = modulated_inputs(2, device)
    expected = run(model, inputs)
    result, graph = rewritten(model, inputs)
    assert_matches(result, expected)
    assert fused_node(graph) == fused
    if name in FUSING:
        epilogue_ops = (F.group_norm, F.silu, F.gelu, operator.mul, operator.add, torch.mul, torch.add, "mul", "add")
        assert not remaining(graph, *epilogue_ops)
    else:
        assert remaining(graph, F.silu)


def test_graphs_without_group_norm_are_untouched(device):
    graphs = []

    def backend(gm, example_inputs):
        before = str(gm.graph)
        assert fuse_group_norms(gm.graph) == 0
        graphs.append((before, str(gm.graph)))
        return gm

    x = torch.randn(2, 8, 4, 4, device=device)
    torch.compile(lambda x: F.silu(x * 2 + 1), backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1 and graphs[0][0] == graphs[0][1]


@pytest.mark.parametrize("recorded", [torch.float32, torch.float64], ids=["fp32 (CUDA autocast)", "fp64"])
def test_autocast_norms_keep_torch_dtypes(recorded, device):
    """A 16-bit group_norm that Dynamo recorded as fp32 (what CUDA autocast does; on a CPU autocast
    leaves the dtype, so the test sets it) becomes the op writing fp32 from the 16-bit input, with
    torch's values; any other change of dtype is left to torch."""
    results = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is F.group_norm:
                node.meta["example_value"] = node.meta["example_value"].to(recorded)
        results.append(fuse_group_norms(gm.graph))
        gm.recompile()
        return gm

    x = torch.randn(2, 8, 4, 4, device=device, dtype=torch.bfloat16)
    y = torch.compile(lambda x: F.silu(F.group_norm(x, 4, eps=EPS)), backend=backend, fullgraph=True)(x)
    if recorded is torch.float64:
        assert results == [0]
        return
    assert results == [1] and y.dtype == torch.float32
    expected = F.silu(F.group_norm(x.double(), 4, eps=EPS))
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32 from the exact bf16 input


def test_forward_ad_is_never_silent(device):
    """torch.autograd.forward_ad through a graph compiled by AOTAutograd (as Inductor's are) raises
    torch's NotImplementedError, fused or not; torch.func.jvp of such a function gives torch's tangent.
    The pass runs before AOTAutograd here as in Inductor, which is left out (its compile is slow)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8)).to(device, torch.float64)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    tangent = torch.randn_like(x)
    expected = torch.func.jvp(model, (x,), (tangent,))
    fused = []

    def backend(gm, example_inputs):
        fused.append(fuse_group_norms(gm.graph))
        gm.recompile()
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=backend)
    with fwAD.dual_level(), pytest.raises(NotImplementedError):
        compiled(fwAD.make_dual(x, tangent))
    assert fused == [1]
    got = torch.func.jvp(compiled, (x,), (tangent,))
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= TOL * e.abs().max()


def test_switch_is_idempotent_a_context_manager_and_keeps_a_users_pass():
    calls = []
    inductor_config.pre_grad_custom_pass = calls.append  # a user's own pass, installed before ours
    try:
        gn_triton.enable_compile_fusion()
        installed = inductor_config.pre_grad_custom_pass
        gn_triton.enable_compile_fusion()
        assert inductor_config.pre_grad_custom_pass is installed
        assert installed.uuid() is None  # the user's pass has none: Inductor does not cache
        installed(torch.fx.Graph())
        assert len(calls) == 1  # the user's pass still runs
        with gn_triton.disable_compile_fusion():
            assert inductor_config.pre_grad_custom_pass == calls.append
        assert inductor_config.pre_grad_custom_pass is installed
        gn_triton.disable_compile_fusion()
        gn_triton.disable_compile_fusion()
        assert inductor_config.pre_grad_custom_pass == calls.append
    finally:
        inductor_config.pre_grad_custom_pass = None
    with gn_triton.enable_compile_fusion():
        assert isinstance(inductor_config.pre_grad_custom_pass.uuid(), tuple)  # cacheable
    assert inductor_config.pre_grad_custom_pass is None


@pytest.mark.parametrize(
    "dtype, size",
    [(torch.float32, 1e-8), (torch.float32, 1e-3), (torch.bfloat16, 1e-2)],
    ids=["fp32 1e-8", "fp32 1e-3", "bf16 1e-2"],
)
def test_a_general_multiplier_stays_exact(dtype, size, device):
    """`group_norm(x) * m` with m not written as 1 + s: the op normalises, the multiply stays in the
    graph, and the result is as close to float64 as torch's eager one (folding m as scale = m - 1
    gave zeros for fp32 m = 1e-8, 1.4e-5 relative error for 1e-3 and 9.7% for bf16 1e-2)."""
    fused = []

    def backend(gm, example_inputs):
        fused.append((fuse_group_norms(gm.graph), len(remaining(gm.graph, operator.mul))))
        gm.recompile()
        return gm

    x = (3 + torch.randn(2, 6, 5, 3, dtype=torch.float64, device=device)).to(dtype)
    m = (size * (1 + torch.rand(2, 6, 1, 1, dtype=torch.float64, device=device))).to(dtype)
    got = torch.compile(lambda x, m: F.group_norm(x, 3) * m, backend=backend, fullgraph=True)(x, m)
    expected = F.group_norm(x.double(), 3) * m.double()
    eager = F.group_norm(x, 3) * m

    def error(y):
        return ((y.double() - expected).abs().max() / expected.abs().max()).item()

    assert error(got) <= 2 * error(eager) + (1e-6 if dtype is torch.float32 else 1e-3)
    assert fused == [(1, 1)]  # the op normalises; the multiply is still there


def test_a_recompile_after_the_context_block_runs_without_the_fusion(device):
    """The pass is part of Inductor's configuration when a graph compiles, not of the compiled
    function: a recompile (here a new batch size) after `with enable_compile_fusion():` ended lowers
    GroupNorm with Inductor's own kernels (documented in compile_fusion and docs/usage.md)."""
    norm = torch.nn.GroupNorm(2, 4).double().to(device)
    compiled = torch.compile(lambda x: F.silu(norm(x)), fullgraph=True)
    with torch.no_grad():
        with gn_triton.enable_compile_fusion(), generated_code() as codes:
            compiled(torch.randn(2, 4, 3, dtype=torch.float64, device=device))
        assert fused_calls("\n".join(codes))
        with generated_code() as codes:
            x = torch.randn(3, 4, 3, dtype=torch.float64, device=device)
            y = compiled(x)
        code = "\n".join(codes)
        assert code and not fused_calls(code) and "native_group_norm" in code
        assert (y - F.silu(norm(x))).abs().max() <= TOL


def test_fusion_options_keep_the_pass_with_the_compiled_function(device):
    """torch.compile(..., options=fusion_options()): the first compile and the recompile for a new
    batch size both fuse, with the switches off."""
    norm = torch.nn.GroupNorm(2, 4).double().to(device)
    compiled = torch.compile(lambda x: F.silu(norm(x)), options=gn_triton.compile_fusion.fusion_options())
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 4, 3, dtype=torch.float64, device=device)
            with generated_code() as codes:
                y = compiled(x)
            [call] = fused_calls("\n".join(codes))
            assert epilogue(call) == ("'silu'", False, False)
            assert (y - F.silu(norm(x))).abs().max() <= TOL
    assert inductor_config.pre_grad_custom_pass is None
