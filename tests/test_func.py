"""torch.func transforms and forward-mode AD over gn_triton.group_norm, each against the same transform
over torch's own ops (F.group_norm, then the epilogue in torch ops) in float64, second derivatives
included (forward over forward raises). Tiny shapes: every transform runs the kernels (in the interpreter on a CPU)."""

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from gn_testing import make_input, make_modulation, make_params, torch_group_norm
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import gn_triton
from gn_triton import autograd

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
# (activation, scale and shift given, input layout)
EPILOGUES = {
    "plain": (None, False, "contiguous"),
    "silu, scale and shift": ("silu", True, "contiguous"),
    "gelu_tanh, channels_last": ("gelu_tanh", False, "channels_last"),
}


def problem(name, device, N=2):
    activation, modulated, layout = EPILOGUES[name]
    x = make_input((N, 4, 3, 2), F64, device, offset=1.0, layout=layout)
    w, b = make_params(4, F64, device)
    scale, shift = make_modulation(N, 4, F64, device) if modulated else (None, None)
    return activation, (x, w, b, scale, shift)


def both(activation):
    """gn_triton's and torch's function of (x, w, b, scale, shift)."""

    def make(fn, contiguous=False):
        return lambda x, w, b, s, t: fn(
            x.contiguous() if contiguous else x, 2, w, b, 1e-5, activation=activation, scale=s, shift=t
        )

    # torch's forward-mode formula of group_norm fails on channels_last input ("view size is not
    # compatible"): it gets a contiguous copy
    return make(gn_triton.group_norm), make(torch_group_norm, contiguous=True)


def assert_trees_close(got, expected):
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def over_present(f, args):
    """f as a function of the arguments in `args` that are not None (the others fixed at None)."""
    present = [i for i, a in enumerate(args) if a is not None]

    def g(*values):
        full = list(args)
        for i, v in zip(present, values):
            full[i] = v
        return f(*full)

    return g, tuple(args[i] for i in present)


class Transformed(NamedTuple):
    """gn_triton's and torch's group_norm of one epilogue as functions of its present arguments."""

    activation: str | None
    args: tuple  # (x, w, b, scale, shift), None where absent
    ours: Callable
    theirs: Callable
    values: tuple  # the present arguments
    argnums: tuple  # every present argument's index


def both_over_present(name, device) -> Transformed:
    activation, args = problem(name, device)
    (ours, values), (theirs, _) = (over_present(f, args) for f in both(activation))
    return Transformed(activation, args, ours, theirs, values, tuple(range(len(values))))


@pytest.mark.parametrize("name", EPILOGUES)
def test_grad_vjp_and_jacrev(name, device):
    _, _, ours, theirs, values, argnums = both_over_present(name, device)
    dy = torch.randn_like(values[0])
    loss = lambda f: lambda *a: (f(*a) * dy).sum()
    assert_trees_close(grad(loss(ours), argnums)(*values), grad(loss(theirs), argnums)(*values))
    (y, pull), (y_t, pull_t) = vjp(ours, *values), vjp(theirs, *values)
    assert_trees_close((y, pull(dy)), (y_t, pull_t(dy)))
    # jacrev vmaps over every output element: a (N, C) reduction of y keeps that batch small
    rows = lambda f: lambda *a: (f(*a) * dy).flatten(2).sum(-1)
    assert_trees_close(jacrev(rows(ours), argnums)(*values), jacrev(rows(theirs), argnums)(*values))


@pytest.mark.parametrize("name", EPILOGUES)
def test_forward_mode(name, device):
    """jvp, jacfwd and torch.autograd.forward_ad: tangents of every input at once."""
    activation, args, ours, theirs, values, argnums = both_over_present(name, device)
    tangents = tuple(torch.randn_like(v) for v in values)
    assert_trees_close(jvp(ours, values, tangents), jvp(theirs, values, tangents))
    assert_trees_close(jacfwd(ours, argnums)(*values), jacfwd(theirs, argnums)(*values))
    tangents = tuple(None if a is None else torch.randn_like(a) for a in args)
    results = []
    for f in both(activation):
        with fwAD.dual_level():
            duals = [None if a is None else fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
            primal, tangent = fwAD.unpack_dual(f(*duals))
            results.append((primal.clone(), tangent.clone()))
    assert_trees_close(*results)


# (name, in_dims of (x, w, b, scale, shift)): which arguments carry the vmapped dimension, and where
VMAPS = {
    "input": (0, None, None, None, None),
    "input at dim 2": (2, None, None, None, None),
    "input, scale and shift": (0, None, None, 0, 0),
    "weight and bias only": (None, 0, 0, None, None),
    "everything": (0, 0, 0, 1, 0),
}


@pytest.mark.parametrize("vmapped", VMAPS)
def test_vmap(vmapped, device):
    """A vmapped input folds into the batch; a vmapped weight or bias into the per-sample modulation."""
    activation, args = problem("silu, scale and shift", device)
    ours, theirs = both(activation)
    in_dims = VMAPS[vmapped]
    batched = tuple(a if d is None else torch.stack([a * (1 + k) for k in range(3)], d) for a, d in zip(args, in_dims))
    assert_trees_close(vmap(ours, in_dims)(*batched), vmap(theirs, in_dims)(*batched))
    # per-instance gradients through the vmapped function, and a gradient of the vmapped function
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()
    assert_trees_close(
        vmap(grad(loss(ours), (0, 1, 2, 3, 4)), in_dims)(*batched),
        vmap(grad(loss(theirs), (0, 1, 2, 3, 4)), in_dims)(*batched),
    )
    outer = lambda f: lambda *a: (vmap(f, in_dims)(*a) ** 2).sum()
    assert_trees_close(grad(outer(ours), (0, 1, 2))(*batched), grad(outer(theirs), (0, 1, 2))(*batched))


def test_vmapped_bias_without_weight(device):
    """Against a loop over the instances with a weight of ones: torch's own group_norm fails on a
    bias without a weight in vmap(grad) and, on a CPU, in its backward."""
    x = make_input((3, 2, 4, 3), F64, device)
    b = torch.randn(3, 4, dtype=F64, device=device)
    ones = torch.ones(4, dtype=F64, device=device)
    loss = lambda f, w=None: lambda x, b: (f(x, 2, w, b) ** 2).sum()
    expected = [grad(loss(torch_group_norm, ones), (0, 1))(x[i], b[i]) for i in range(3)]
    expected = tuple(torch.stack(g) for g in zip(*expected))
    assert_trees_close(vmap(grad(loss(gn_triton.group_norm), (0, 1)))(x, b), expected)


def test_per_sample_gradients(device):
    """The DP-SGD pattern (Opacus's functorch mode): vmap(grad) of the parameters over samples."""
    activation, (x, w, b, _, _) = problem("plain", device, N=3)
    ours, theirs = both(activation)
    dy = torch.randn_like(x)
    per_sample = lambda f: vmap(
        grad(lambda w, b, x, dy: (f(x[None], w, b, None, None) * dy[None]).sum(), (0, 1)), (None, None, 0, 0)
    )(w, b, x, dy)
    assert_trees_close(per_sample(ours), per_sample(theirs))


def test_reverse_over_forward_is_exact(device):
    activation, (x, w, b, scale, shift) = problem("silu, scale and shift", device, N=1)
    ours, theirs = both(activation)
    x = x[..., 0]  # (1, 4, 3): a Hessian of 12 x 12
    loss = lambda f: lambda x: (f(x, w, b, scale, shift) ** 2).sum()
    assert_trees_close(jacrev(jacfwd(loss(ours)))(x), jacrev(jacfwd(loss(theirs)))(x))


@pytest.mark.parametrize("name", list(EPILOGUES))
def test_second_derivatives_equal_torch(name, device):
    """grad of grad, forward over reverse and Hessians: the backward, taken while a graph of it is
    built, is differentiable (torch ops), and equal to torch's second derivatives in float64."""
    activation, args = problem(name, device, N=1)
    ours, theirs = both(activation)
    x = args[0][..., 0]  # (1, 4, 3): a Hessian of 12 x 12
    rest = args[1:]
    loss = lambda f: lambda x, *rest: (f(x, *rest) ** 2).sum()  # noqa: E731
    penalty = lambda f: lambda x, *rest: (grad(loss(f))(x, *rest) ** 2).sum()  # noqa: E731
    params = [i for i, a in enumerate((x, *rest)) if a is not None]
    for transform in (
        lambda f: grad(penalty(f), argnums=tuple(params))(x, *rest),
        lambda f: hessian(loss(f))(x, *rest),
        lambda f: jacfwd(jacrev(loss(f)))(x, *rest),
        lambda f: jacrev(jacrev(loss(f)))(x, *rest),
    ):
        assert_trees_close(transform(ours), transform(theirs))


def test_forward_over_forward_raises(device):
    """Never a silent zero: forward mode over forward mode is not implemented, and says so."""
    _, (x, w, b, _, _) = problem("plain", device)
    loss = lambda x: (gn_triton.group_norm(x, 2, w, b) ** 2).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="forward mode over forward mode"):
        jacfwd(jacfwd(loss))(x[..., 0])


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap(grad)"])
def test_torch_compile_over_transforms(transform, device, monkeypatch):
    """torch.compile of a torch.func transform of gn_triton.group_norm works and equals the same
    transform of torch's ops (Dynamo cannot run the custom ops' autograd under a transform: torch's
    ops there, which Inductor compiles)."""
    # conftest's NaN-filled torch.empty is a mutation in the traced graph (torch.func's own allocations),
    # which Inductor refuses: torch's own here
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    activation, (x, w, b, scale, shift) = problem("silu, scale and shift", device)
    ours, theirs = both(activation)
    loss = lambda f: lambda x: (f(x, w, b, scale, shift) ** 2).sum()  # noqa: E731
    make = {"grad": grad, "jacrev": jacrev, "vmap(grad)": lambda f: vmap(grad(f), in_dims=0)}[transform]
    xs = torch.stack([x, x + 1]) if transform == "vmap(grad)" else x
    torch._dynamo.reset()
    assert_trees_close(torch.compile(make(loss(ours)))(xs), make(loss(theirs))(xs))


def test_vmap_over_weights_in_their_last_dim(device):
    """vmap over a batch of weights and biases held as (C, batch): in_dims=1."""
    _, (x, _, _, _, _) = problem("plain", device)
    W, B = make_input((4, 5), F64, device), make_input((4, 5), F64, device)
    ours, theirs = both(None)
    f = lambda fn: vmap(lambda w, b: fn(x, w, b, None, None), in_dims=(1, 1))  # noqa: E731
    assert_trees_close(f(ours)(W, B), f(theirs)(W, B))


def test_a_single_grad_keeps_the_kernels_and_refuses_an_outer_autograd(device, monkeypatch):
    """torch.func.grad builds a graph of every gradient: a single one (and vmap(grad), Opacus's
    per-sample gradients) still runs the backward kernels; plain autograd differentiating that
    gradient again raises (never a silent zero), where nested torch.func transforms are exact."""
    _, (x, w, b, _, _) = problem("plain", device)
    loss = lambda x: (gn_triton.group_norm(x, 2, w, b) ** 2).sum()  # noqa: E731
    expected = grad(lambda x: (torch_group_norm(x, 2, w, b) ** 2).sum())(x)
    monkeypatch.setattr(autograd, "_torch_backward", lambda *args: pytest.fail("the torch-op backward ran"))
    assert_trees_close(grad(loss)(x), expected)
    assert_trees_close(vmap(grad(loss))(x[None]), expected[None])
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad((grad(loss)(leaf) ** 2).sum() + leaf.sum(), leaf)
