"""The opt-in eager override (gn_triton.enable_eager_override): torch's own nn.GroupNorm, F.group_norm
and torch.group_norm run gn_triton's kernels while it is on, with ATen's semantics; what gn_triton
does not take falls through to ATen's kernel; off again after disable and after the context.

That the kernels ran is shown by what only they do: on mean-shifted fp32 data (x = 1e4 + randn)
torch's kernels lose ~1e-3 to the rounded mean, gn_triton's keep ~1e-6. That a call fell through is
shown by a result bitwise equal to ATen's on such data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gn_triton
from gn_triton.reference import group_norm_reference

G, C = 3, 6
SHAPE = (2, C, 5, 7)
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def override_off():
    gn_triton.disable_eager_override()
    yield
    gn_triton.disable_eager_override()


def shifted(*shape, dtype=torch.float32, device="cpu"):
    return (1e4 + torch.randn(*shape, dtype=torch.float64)).to(dtype).to(device)


ENTRY_POINTS = {
    "nn.GroupNorm": lambda x, w, b: _module(w, b)(x),
    "F.group_norm": lambda x, w, b: F.group_norm(x, G, w, b),
    "torch.group_norm": lambda x, w, b: torch.group_norm(x, G, w, b),
}


def _module(w, b):
    m = torch.nn.GroupNorm(G, C).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def forward_backward(fn, x, w, b, dy):
    """y and the gradients of x, weight and bias (those of the module's own parameters for nn.GroupNorm)."""
    x = x.detach().requires_grad_()
    if fn is ENTRY_POINTS["nn.GroupNorm"]:
        m = _module(w, b)
        y = m(x)
        params = (m.weight, m.bias)
    else:
        w, b = (t.detach().requires_grad_() for t in (w, b))
        y = fn(x, w, b)
        params = (w, b)
    return (y.detach(), *torch.autograd.grad(y, (x, *params), dy))


def max_error(got, exact):
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_torch_group_norms_run_gn_triton_kernels(entry, device):
    """On mean-shifted fp32 data each entry point's output and gradients have gn_triton's accuracy
    against float64, far better than torch's own kernels on the same call."""
    fn = ENTRY_POINTS[entry]
    x = shifted(*SHAPE, device=device)
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    dy = torch.randn(SHAPE, device=device)
    exact = forward_backward(lambda x, w, b: group_norm_reference(x, G, w, b), x.double(), w.double(), b.double(), dy)
    torch_out = forward_backward(fn, x, w, b, dy)
    with gn_triton.enable_eager_override():
        ours = forward_backward(fn, x, w, b, dy)
    for name, got, base, ref in zip(("y", "dx", "dweight", "dbias"), ours, torch_out, exact):
        assert got.dtype == base.dtype and got.shape == base.shape, name
        assert max_error(got, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), name
    for name, i in (("y", 0), ("dx", 1), ("dweight", 2)):  # dbias = Σ dy has no mean in it
        assert max_error(ours[i], exact[i]) * 100 < max_error(torch_out[i], exact[i]), name


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("params", ["weight+bias", "weight", "none"])
def test_float64_matches_torch(params, layout, device):
    """float64: output, saved statistics (values, dtypes, strides) and every gradient equal torch's
    own float64 result, the output mask as autograd sets it."""
    x = LAYOUTS[layout](torch.randn(SHAPE, dtype=torch.float64, device=device) * 3 + 2)
    w = torch.randn(C, dtype=torch.float64, device=device) if params != "none" else None
    b = torch.randn(C, dtype=torch.float64, device=device) if params == "weight+bias" else None
    dy = LAYOUTS[layout](torch.randn(SHAPE, dtype=torch.float64, device=device))

    def run():
        xs = x.detach().requires_grad_()
        ps = [p.detach().requires_grad_() for p in (w, b) if p is not None]
        y = F.group_norm(xs, G, *[*ps, None, None][:2])
        stats = aten.native_group_norm(x, w, b, SHAPE[0], C, 35, G, 1e-5)
        return (y, *stats[1:], *torch.autograd.grad(y, (xs, *ps), dy))

    expected = run()
    with gn_triton.enable_eager_override():
        got = run()
    assert len(got) == len(expected)
    assert not torch.equal(got[0], expected[0])  # gn_triton's kernels ran: their last bits differ from ATen's
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride()
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_double_backward_matches_torch(device):
    """Second derivatives (ATen's composite formula, above the override) equal torch's in float64."""
    x = torch.randn(SHAPE, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(C, dtype=torch.float64, device=device, requires_grad=True)

    def run():
        y = F.group_norm(x, G, w)
        (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), (x, w))

    expected = run()
    with gn_triton.enable_eager_override():
        got = run()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


STATS_CASES = {  # input dtype, parameter dtype (None: no weight or bias)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-no-params": (torch.bfloat16, None),
    "bf16-fp32-params": (torch.bfloat16, torch.float32),
    "fp16-fp32-params": (torch.float16, torch.float32),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_outputs_and_statistics_as_aten_returns_them(case, device):
    """Direct calls of both ATen ops: the same outputs (None where the mask says so), dtypes and
    strides as ATen's own kernels, values within the input dtype's rounding."""
    dtype, pdtype = STATS_CASES[case]
    x = torch.randn(SHAPE, device=device).to(dtype)
    w = None if pdtype is None else torch.randn(C, device=device, dtype=pdtype)
    dy = torch.randn(SHAPE, device=device).to(dtype)
    masks = [[True, False, False]]
    if w is not None:
        masks += [[True, True, True], [False, True, False], [False, False, False]]

    def run():
        y, mean, rstd = aten.native_group_norm(x, w, w, SHAPE[0], C, 35, G, 1e-5)
        grads = [aten.native_group_norm_backward(dy, x, mean, rstd, w, SHAPE[0], C, 35, G, m) for m in masks]
        return [y, mean, rstd, *(g for gs in grads for g in gs)]

    expected = run()
    with gn_triton.enable_eager_override():
        got = run()
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride()
            torch.testing.assert_close(g, e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()))


def test_backward_recovers_the_mean_from_aten_shaped_statistics(device):
    """The backward op, given the forward's (mean, rstd) in ATen's form (one rounded fp32 mean), still
    has gn_triton's accuracy on shifted data: it recomputes what the rounded mean lost. A mean that is
    not the input's is used as given, as ATen's backward uses it."""
    n = SHAPE[0]
    x, dy, w = shifted(*SHAPE, device=device), torch.randn(SHAPE, device=device), torch.randn(C, device=device)
    xr = x.double().requires_grad_()
    exact_dx = torch.autograd.grad(group_norm_reference(xr, G, w.double()), xr, dy.double())[0]
    centered = x - 1e4  # data near 0, where fp32 loses nothing to a mean

    def dx(x, mean, rstd):
        return aten.native_group_norm_backward(dy, x, mean, rstd, w, n, C, 35, G, [True, False, False])[0]

    with gn_triton.enable_eager_override():
        _, mean, rstd = aten.native_group_norm(x, w, None, n, C, 35, G, 1e-5)
        _, _, centered_rstd = aten.native_group_norm(centered, w, None, n, C, 35, G, 1e-5)
        foreign = torch.randn_like(mean)  # not the mean of `centered`
        ours, ours_foreign = dx(x, mean, rstd), dx(centered, foreign, centered_rstd)
    assert mean.dtype == torch.float32
    aten_dx, aten_foreign = dx(x, mean, rstd), dx(centered, foreign, centered_rstd)
    assert max_error(ours, exact_dx) <= 1e-5 * exact_dx.abs().max().item()
    assert max_error(ours, exact_dx) * 100 < max_error(aten_dx, exact_dx)
    torch.testing.assert_close(ours_foreign, aten_foreign, rtol=1e-4, atol=1e-4)


def test_autocast_region_matches_torch(device):
    """Autocast runs above the override: the output dtype is what torch gives, the values agree."""
    x = torch.randn(SHAPE, device=device)
    conv = torch.nn.Conv2d(C, C, 1).to(device)
    norm = torch.nn.GroupNorm(G, C).to(device)

    def run():
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return norm(conv(x))

    expected = run()
    with gn_triton.enable_eager_override():
        got = run()
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


def test_unsupported_calls_fall_through_to_aten(device):
    """Calls gn_triton does not take run ATen's kernel: bitwise ATen's results (on shifted data,
    where gn_triton's differ), ATen's empty statistics, ATen's errors."""
    x = shifted(*SHAPE, device=device)
    n = SHAPE[0]
    calls = {
        # (N, C*HxW) input with N, C, HxW given: not an (N, C, *) tensor of those sizes
        "flattened input": lambda: aten.native_group_norm(x.reshape(n, -1), None, None, n, C, 35, G, 1e-5),
        "N = 0": lambda: aten.native_group_norm(x[:0], None, None, 0, C, 35, G, 1e-5),
        "empty spatial": lambda: F.group_norm(x[..., :0], G),
    }
    errors = {
        "mixed dtypes": lambda: F.group_norm(x, G, torch.randn(C, dtype=torch.float64, device=device)),
        "channels not divisible": lambda: F.group_norm(x, 4),
        "strided input": lambda: aten.native_group_norm(x[..., ::2], None, None, n, C, 15, G, 1e-5),
        "dbias without weight": lambda: aten.native_group_norm_backward(
            x, x, x[:, :G, 0, 0], x[:, :G, 0, 0], None, n, C, 35, G, [True, False, True]
        ),
    }
    expected = {name: call() for name, call in calls.items()}
    expected_errors = {name: _error(call) for name, call in errors.items()}
    assert all(expected_errors.values())
    with gn_triton.enable_eager_override():
        assert not torch.equal(F.group_norm(x, G), expected["flattened input"][0].reshape(SHAPE))  # it is on
        for name, call in calls.items():
            for g, e in zip(_tuple(call()), _tuple(expected[name]), strict=True):
                assert torch.equal(g, e) or (g.isnan().all() and e.isnan().all()), name
        for name, call in errors.items():
            assert _error(call) == expected_errors[name], name


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _error(call) -> tuple[type, str] | None:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - comparing whatever ATen raises
        return type(e), str(e).split("\n")[0]
    return None


def _runs_gn_triton(x, aten_y) -> bool:
    """Whether F.group_norm on shifted x runs gn_triton's kernel: ATen's result bitwise, or not."""
    return not torch.equal(F.group_norm(x, G), aten_y)


def test_off_after_disable_and_after_the_context_and_idempotent(device):
    x = shifted(*SHAPE, device=device)
    aten_y = F.group_norm(x, G)
    assert not _runs_gn_triton(x, aten_y)
    gn_triton.enable_eager_override()
    gn_triton.enable_eager_override()  # idempotent: one disable undoes both
    assert _runs_gn_triton(x, aten_y)
    gn_triton.disable_eager_override()
    assert not _runs_gn_triton(x, aten_y)
    with gn_triton.enable_eager_override():
        assert _runs_gn_triton(x, aten_y)
        with gn_triton.disable_eager_override():
            assert not _runs_gn_triton(x, aten_y)
        assert _runs_gn_triton(x, aten_y)
        with gn_triton.enable_eager_override():
            assert _runs_gn_triton(x, aten_y)
        assert _runs_gn_triton(x, aten_y)  # the state before the inner block: still on
    assert not _runs_gn_triton(x, aten_y)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_converted_model_calls_gn_triton_once(device):
    """A converted module calls gn_triton's ops and never aten::native_group_norm, so the override
    adds nothing; an unconverted one goes through aten::native_group_norm (where the override acts)."""
    x = torch.randn(SHAPE, device=device)
    model = torch.nn.Sequential(torch.nn.GroupNorm(G, C)).to(device)
    converted = gn_triton.convert_model(torch.nn.Sequential(torch.nn.GroupNorm(G, C)).to(device))
    with gn_triton.enable_eager_override():
        with _OpLog() as plain:
            expected = model(x)
        with _OpLog() as swapped:
            got = converted(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "aten.native_group_norm" in plain.ops
    assert "gn_triton.group_norm_fwd" in swapped.ops and "aten.native_group_norm" not in swapped.ops


def test_compile_and_export_work_with_it_on(device):
    """torch.compile (AOTAutograd's graphs run eagerly, so the override runs inside them) and
    torch.export trace through the override and give its results, forward and backward."""
    x = shifted(*SHAPE, device=device)
    model = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1), torch.nn.GroupNorm(G, C), torch.nn.SiLU()).to(device)
    with gn_triton.enable_eager_override():
        xs = x.detach().requires_grad_()
        expected = model(xs)
        expected_dx = torch.autograd.grad(expected.sum(), xs)[0]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(xs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), xs)[0], expected_dx, rtol=1e-6, atol=1e-6)
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), expected.detach(), rtol=0, atol=0)
    torch.compiler.reset()


def test_inductor_with_the_compile_pass_and_the_override_on(device):
    """Both switches on: Inductor compiles the model (the pass puts gn_triton's op in its graph) and
    the compiled forward and backward match the eager override's."""
    x = shifted(*SHAPE, device=device).requires_grad_()
    model = torch.nn.Sequential(torch.nn.GroupNorm(G, C), torch.nn.SiLU()).to(device)
    with gn_triton.enable_eager_override(), gn_triton.enable_compile_fusion():
        expected = model(x)
        expected_dx = torch.autograd.grad(expected.sum(), x)[0]
        got = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], expected_dx, rtol=1e-6, atol=1e-6)
    torch.compiler.reset()
