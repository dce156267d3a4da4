"""The cached launch programs (gn_triton._launch) and the eager route (gn_triton.autograd.run): a
call's signature is planned once, later calls reuse it and give the same bits; a call whose signature
differs in anything its launches depend on gets a program of its own (right results, against the
float64 reference); the eager route is taken only where nothing must see the custom ops, and gives what
the ops' route gives; one workspace per call. That the compiled entries launch what JITFunction.run
launches is tests/launch_path.py's (the stand-in driver)."""

import numpy as np
import pytest
import torch
from gn_testing import assert_close, forced, make_input, make_params, reference
from torch.utils._python_dispatch import TorchDispatchMode

import gn_triton
from gn_triton import _launch, _tuning, autograd, functional
from gn_triton.reference import TOLERANCE


def _count_planning(monkeypatch) -> list:
    calls = []
    real = _tuning.choose_plan
    monkeypatch.setattr(_tuning, "choose_plan", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_a_signature_is_planned_once_and_gives_the_same_bits(monkeypatch, device):
    x = make_input((2, 8, 5, 7), device=device, offset=3.0).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, device=device))
    planned = _count_planning(monkeypatch)
    results = []
    for _ in range(3):
        y = gn_triton.group_norm(x, 4, w, b, activation="silu")
        results.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
    assert planned.count("fwd") <= 1 and planned.count("bwd") <= 1  # at most once: an earlier test may have
    for later in results[1:]:
        for got, first in zip(later, results[0]):
            assert torch.equal(got, first)
    expected = reference(x.detach(), 4, w.detach(), b.detach(), dy=torch.ones_like(y), activation="silu")
    assert_close(results[-1][0], expected[0], TOLERANCE[torch.float32])


def _variants(device):
    """Calls that differ from the first in one thing a launch depends on."""
    base = make_input((3, 8, 6, 6), device=device, offset=2.0)
    flat = torch.randn(base.numel() + 1, device=device) + 2.0
    return {
        "aligned": base[:2],
        "unaligned view (one element off)": flat[1:].view(3, 8, 6, 6)[:2],
        "channels_last": base[:2].contiguous(memory_format=torch.channels_last),
        "not dense": base.transpose(0, 1).contiguous().transpose(0, 1)[:2],
        "fp64": base[:2].double(),
        "bf16": base[:2].bfloat16(),
        "S = 1": base[:2].reshape(2, 8, 36)[..., :1],
        "another N": base,
    }


@pytest.mark.parametrize("plan", ["fused, small tiles", "split 2, waves of 3 blocks"])
def test_a_changed_signature_gets_a_program_of_its_own(monkeypatch, device, plan):
    w, b = make_params(8, device=device)
    with forced(plan):
        for name, x in _variants(device).items():
            x = x.detach().requires_grad_()
            y = gn_triton.group_norm(x, 4, w, b)
            (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
            expected = reference(x.detach(), 4, w, b, dy=torch.ones_like(y))
            tolerance = TOLERANCE[x.dtype]
            assert_close(y, expected[0], tolerance, f"{name}: y")
            assert_close(dx, expected[1], tolerance, f"{name}: dx")
            assert y.stride() == torch.empty_like(x, memory_format=_launch.memory_format(x)).stride(), name
    keys = {key[0] for key in functional._CHECKED}
    assert len(keys) >= len(_variants(device))  # one signature each


def test_a_strided_weight_after_a_dense_one(device):
    x = make_input((2, 8, 9), device=device, offset=1.0)
    w = torch.randn(16, device=device)
    dense = gn_triton.group_norm(x, 4, w[:8].contiguous())
    strided = gn_triton.group_norm(x, 4, w[::2])
    assert_close(dense, reference(x, 4, w[:8])[0], TOLERANCE[torch.float32])
    assert_close(strided, reference(x, 4, w[::2])[0], TOLERANCE[torch.float32])


def test_the_eager_route_is_taken_only_where_nothing_sees_the_ops(device):
    x = make_input((2, 8, 5), device=device, offset=1.0)
    w, b = make_params(8, device=device)
    with torch.no_grad():
        assert gn_triton.group_norm(x, 4, w, b).grad_fn is None
    leaf = x.clone().requires_grad_()
    assert type(gn_triton.group_norm(leaf, 4, w, b).grad_fn).__name__ == "EagerGroupNormBackward"
    assert autograd.eager(x)
    assert not autograd.eager(torch.nn.Parameter(x))  # a subclass: its own __torch_function__ may apply

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        assert not autograd.eager(x)
        y = gn_triton.group_norm(x, 4, w, b)
    assert any("gn_triton.group_norm_fwd" in op for op in Seen.ops)  # a dispatch mode sees the custom op
    assert_close(y, reference(x, 4, w, b)[0], TOLERANCE[torch.float32])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert not autograd.eager(dual)
        gn_triton.group_norm(dual, 4, w, b)  # forward mode: the ops' route (its jvp)


def test_eager_route_equals_the_ops_route(device):
    """The same program behind both: the same bits for y and every gradient."""
    x = make_input((2, 8, 4, 5), device=device, offset=5.0)
    w, b = make_params(8, device=device)
    dy = torch.randn_like(x)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y, leaves, dy))

    eager = run(lambda x, w, b: gn_triton.group_norm(x, 4, w, b, activation="gelu"))
    ops = run(lambda x, w, b: autograd.GroupNormFunction.apply(x, w, b, 4, 1e-5, "gelu")[0])
    for got, expected in zip(eager, ops):
        assert torch.equal(got, expected)


def test_the_checks_still_run_for_a_known_signature(device):
    """A signature that passed the checks keeps its argument types in the key: a call that differs
    only in a type torch refuses still raises."""
    x = make_input((2, 4, 3), device=device)
    gn_triton.group_norm(x, 2, eps=1e-5)
    with pytest.raises(TypeError, match="num_groups"):
        gn_triton.group_norm(x, True)
    with pytest.raises(TypeError, match="eps"):
        gn_triton.group_norm(x, 2, eps="1e-5")
    y = gn_triton.group_norm(x, int(np.int64(2)))
    assert_close(y, reference(x, 2)[0], TOLERANCE[torch.float32])


def test_one_workspace_per_call(monkeypatch, device):
    """Forward: the output and one workspace (statistics and partials); backward: the gradients and
    one workspace (the partials)."""
    x = make_input((1, 8, 40), device=device).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, device=device))
    with forced("split 3, small tiles"):
        y = gn_triton.group_norm(x, 4, w, b)  # planned: later calls allocate only what they return
        torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        made = []
        for name in ("empty", "empty_like"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, lambda *a, real=real, name=name, **k: made.append(name) or real(*a, **k))
        y = gn_triton.group_norm(x, 4, w, b)
        assert made == ["empty_like", "empty"]  # y, the workspace
        made.clear()
        torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        assert sorted(made) == ["empty", "empty_like", "empty_like", "empty_like"]  # the partials; dx, dw, db


def test_gradient_of_the_gradient_on_the_eager_route(device):
    """create_graph=True: the first-order gradient is right, and differentiating it again gives torch's
    second derivative (issue #28: this raised "not twice differentiable" before)."""
    x = make_input((2, 4, 6), device=device, offset=1.0).requires_grad_()
    dy = torch.randn(2, 4, 6, device=device)
    y = gn_triton.group_norm(x, 2)
    (dx,) = torch.autograd.grad(y, (x,), dy, create_graph=True)
    assert_close(dx, reference(x.detach(), 2, dy=dy)[1], TOLERANCE[torch.float32])
    (expected_dx,) = torch.autograd.grad(torch.nn.functional.group_norm(x, 2), (x,), dy, create_graph=True)
    got, expected = (torch.autograd.grad((d**2).sum(), (x,))[0] for d in (dx, expected_dx))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_saved_tensor_hook_that_changes_x_layout(device):
    """Offloading hooks may give the saved x back in other strides: the backward follows the tensor it
    gets, not the forward's signature."""
    x = make_input((2, 8, 6, 6), device=device, offset=2.0).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, device=device))
    dy = torch.randn(2, 8, 6, 6, device=device)
    relaid = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    expected = reference(x.detach(), 4, w.detach(), b.detach(), dy=dy, activation="silu")
    for hooked in (False, True):  # the first step plans the backward for x as it was
        with torch.autograd.graph.saved_tensors_hooks(relaid if hooked else (lambda t: t), lambda t: t):
            y = gn_triton.group_norm(x, 4, w, b, activation="silu")
        grads = torch.autograd.grad(y, (x, w, b), dy)
        for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected[1:4]):
            assert_close(got, want, TOLERANCE[torch.float32], f"{name}, hooked={hooked}")


def test_torch_jit_trace_records_the_op_not_a_launch(device):
    """A traced module replays gn_triton's op on new input: tracing takes the ops' route."""
    norm = gn_triton.GroupNorm(2, 4).to(device)
    x = make_input((2, 4, 5), device=device)
    other = make_input((2, 4, 5), device=device, offset=3.0, scale=2.0)
    with torch.no_grad():
        traced = torch.jit.trace(norm, x)
        y = traced(other)
    assert_close(y, reference(other, 2, norm.weight.detach(), norm.bias.detach())[0], TOLERANCE[torch.float32])


def test_a_compiled_graph_calls_gn_tritons_op(device):
    """torch.compile without a torch.func transform: the graph holds gn_triton's op (not torch's ops,
    which only a transform inside the compiled function calls for)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    x = make_input((2, 4, 6), device=device)
    w, b = make_params(4, device=device)
    torch.compiler.reset()
    y = torch.compile(lambda x: gn_triton.group_norm(x, 2, w, b), backend=backend, fullgraph=True)(x)
    assert graphs and "gn_triton.group_norm_fwd" in graphs[0], graphs
    assert_close(y, reference(x, 2, w, b)[0], TOLERANCE[torch.float32])
