"""Differentiation of the ops: an autograd.Function for the eager path (reverse mode, forward mode and
every torch.func transform), and the same backward registered on the forward op itself
(torch.library.register_autograd), so a graph that calls `gn_triton::group_norm_fwd` directly (what
the torch.compile fusion pass inserts) differentiates through gn_triton's backward op.

The plain eager call (`run`: no torch.func transform, forward-mode AD, torch function or dispatch mode,
or tensor subclass; see `eager`) takes a shorter route to the same kernels: the launch programs of
gn_triton._launch called directly, without the custom ops' dispatch, and without an autograd.Function
at all when nothing needs a gradient (EagerGroupNorm otherwise). docs/host-path.md has its costs.

torch.func: the Function has setup_context (so grad, vjp and jacrev apply) and generate_vmap_rule:
vmap runs its forward, backward and jvp under vmap, and the ops' batching rules (gn_triton._ops)
fold the vmapped dimension into the batch N. Forward mode (jvp, torch.autograd.forward_ad) is the
formula in `_tangent`, in torch ops; torch.library has no forward-mode registration for custom ops,
so a graph calling the op directly refuses forward AD with torch's error; reverse mode over that
formula (jacrev(jacfwd(f))) is exact, since it is differentiable torch ops. Second derivatives of the
gradient (double backward with create_graph=True, grad of grad, jacfwd(jacrev(f)), torch.func.hessian):
while a graph of the gradients is being built for another derivative, the backward is computed in
differentiable torch ops from x and the parameters (_torch_backward); otherwise by the kernels (a
single torch.func.grad too, behind _Backward, whose derivatives raise: _differentiated_again).
Forward mode over forward mode (jacfwd(jacfwd(f))) is not implemented and raises a RuntimeError,
never a silent zero (_nested_forward_mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from . import _activations, _checks, _launch, _ops
from ._plan import Affine


def _backward(ctx, grad_out, backward_op=_ops.group_norm_bwd):
    """Gradients of (input, weight, bias, num_groups, eps, activation, scale, shift, out_dtype): the
    argument order of both GroupNormFunction.apply and the forward op. (The dispatcher drops an op
    call's trailing arguments that equal their defaults: then fewer are asked for, and returned.) When a
    graph of the gradients is being built, they are differentiable torch ops (_torch_backward); else the
    backward op's kernels."""
    input, weight, bias, scale, shift, mean, mean_lo, rstd = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)
    needs = (*ctx.needs_input_grad, *[False] * (9 - n_inputs))
    mask = [needs[0], needs[1], needs[2], needs[6], needs[7]]
    if bias is None and ctx.bias_dtype is not None:  # a bias the backward does not read: only db's dtype matters
        bias = torch.zeros(input.shape[1], dtype=ctx.bias_dtype, device=input.device)
    if torch.is_grad_enabled() and _differentiated_again():
        saved = (input, weight, bias, scale, shift)
        dx, dw, db, dscale, dshift = _torch_backward(grad_out, saved, ctx.num_groups, ctx.eps, ctx.activation, mask)
    else:
        if torch.is_grad_enabled():  # a single torch.func.grad (vmap(grad) too): the kernels, differentiable no more
            backward_op = _backward_twice_raises
        dx, dw, db, dscale, dshift = backward_op(
            grad_out, input, weight, bias, mean, mean_lo, rstd, ctx.num_groups, mask, ctx.activation, scale, shift
        )
        dx, dw, db, dscale, dshift = (g if m else None for g, m in zip((dx, dw, db, dscale, dshift), mask))
    return (dx, dw, db, None, None, None, dscale, dshift, None)[:n_inputs]


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, num_groups, _eps, activation, scale, shift = (*inputs, *[None] * (8 - len(inputs)))[:8]
    _y, mean, mean_lo, rstd = output
    ctx.mark_non_differentiable(mean, mean_lo, rstd)  # statistics: outputs for the backward only
    # The backward reads the bias only to recompute the pre-activation or for dscale: else it is not
    # saved, so that it may change in place before the backward (as torch's group_norm allows).
    reads_bias = activation is not None or scale is not None
    ctx.bias_dtype = None if bias is None or reads_bias else bias.dtype
    ctx.save_for_backward(input, weight, bias if reads_bias else None, scale, shift, mean, mean_lo, rstd)
    ctx.num_groups = num_groups
    ctx.eps = _eps
    ctx.activation = activation


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b where None is a zero tangent."""
    return b if a is None else a if b is None else a + b


class _Differentiable:
    """x's normalisation in torch ops, its statistics taken again from x (differentiable: the saved ones
    are constants to autograd), in the statistics' dtype `acc`: rstd and x_hat_rows per (N, G, row), and
    views of a (C,) or (N, C) tensor against x (`channel`, `sample`)."""

    def __init__(self, input: torch.Tensor, num_groups: int, eps: float) -> None:
        self.acc = acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        N, C = input.shape[:2]
        spatial = [1] * (input.dim() - 2)
        self.channel = lambda t: t.to(acc).reshape(1, C, *spatial)
        self.sample = lambda t: t.to(acc).reshape(N, C, *spatial)
        rows = input.to(acc).reshape(N, num_groups, -1)
        var, mean = torch.var_mean(rows, -1, correction=0, keepdim=True)
        self.rstd = torch.rsqrt(var + eps)
        self.x_hat_rows = (rows - mean) * self.rstd


def _tangent(saved, num_groups: int, eps: float, activation, tangents, out_dtype: torch.dtype) -> torch.Tensor:
    """The forward-mode derivative of y = act(z), z = u*(1 + s) + t, u = x_hat*w + b, in torch ops in
    the statistics' dtype. With <.> the mean over a group and r = rstd (mean' = <x'>, r' = -r^2*<x_hat*x'>):
        x_hat' = r*(x' - <x'> - x_hat*<x_hat*x'>)
        u' = x_hat'*w + x_hat*w' + b',   z' = u'*(1 + s) + u*s' + t',   y' = act'(z)*z'.
    A tangent that is None is zero. The statistics are taken again here, differentiably, so that
    reverse mode over this formula (torch.func.jacrev(jacfwd(f))) is exact."""
    input, weight, bias, scale, shift = saved[:5]
    dx, dw, db, ds, dt = tangents
    f = _Differentiable(input, num_groups, eps)
    acc, channel, sample, rstd, x_hat = f.acc, f.channel, f.sample, f.rstd, f.x_hat_rows
    N = input.shape[0]
    u_dot = None
    if dx is not None:
        d_rows = dx.to(acc).reshape(N, num_groups, -1)
        d_mean = d_rows.mean(-1, keepdim=True)
        d_var = (x_hat * d_rows).mean(-1, keepdim=True)
        u_dot = (rstd * (d_rows - d_mean - x_hat * d_var)).reshape(input.shape)
        u_dot = u_dot if weight is None else u_dot * channel(weight)
    x_hat = x_hat.reshape(input.shape)
    u_dot = _plus(u_dot, None if dw is None else x_hat * channel(dw))
    u_dot = _plus(u_dot, None if db is None else channel(db).expand(input.shape))
    u = x_hat if weight is None else x_hat * channel(weight)
    u = u if bias is None else u + channel(bias)
    z_dot = u_dot if scale is None or u_dot is None else u_dot * (1 + sample(scale))
    z_dot = _plus(z_dot, None if ds is None else u * sample(ds))
    z_dot = _plus(z_dot, None if dt is None else sample(dt).expand(input.shape))
    z_dot = torch.zeros_like(u) if z_dot is None else z_dot
    if activation is not None:
        z = u if scale is None else u * (1 + sample(scale))
        z = z if shift is None else z + sample(shift)
        z_dot = _activations.ACTIVATIONS[activation].tangent(z_dot, z)
    return z_dot.to(out_dtype)


_NOT_TWICE = (
    "gn_triton.group_norm: forward mode over forward mode (jvp of a jvp, jacfwd(jacfwd(f))) is not implemented; "
    "use reverse mode for one of the two (jacrev(jacfwd(f)), jacfwd(jacrev(f)), torch.func.hessian)"
)


def _nested_forward_mode() -> bool:
    """Whether a forward-mode transform is differentiating this one's tangent (jvp of jvp, jacfwd of
    jacfwd): torch runs a Function's jvp with forward AD off, so the outer transform would take the
    tangent for a constant and silently get a zero second derivative."""
    interpreters = retrieve_all_functorch_interpreters()
    return sum(i.key() == TransformType.Jvp for i in interpreters) > 1


def _differentiated_again() -> bool:
    """With a graph of the gradients being built, whether they may be differentiated again: always
    outside torch.func (create_graph=True); under it only with another differentiating transform around
    (grad of grad, jacrev of jacrev, forward mode over reverse): torch.func.grad builds a graph of every
    gradient, and a single one (vmap(grad): per-sample gradients) keeps the kernels, behind _Backward."""
    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    if not keys:
        return True
    if keys[-1] == TransformType.Grad:  # the grad computing this gradient (a vjp's runs after its level is gone)
        keys.pop()
    return TransformType.Jvp in keys or TransformType.Grad in keys


class _Backward(torch.autograd.Function):
    """The backward op as a function of its tensors whose own derivatives raise (a plain autograd
    differentiating the result of a single torch.func.grad): once_differentiable alone would let that
    take the gradient for a constant and return zeros."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, input, weight, bias, mean, mean_lo, rstd, scale, shift, spec):
        num_groups, mask, activation = spec.value  # not pytree leaves: torch.func flattens apply's arguments
        return _ops.group_norm_bwd(
            grad_out, input, weight, bias, mean, mean_lo, rstd, num_groups, list(mask), activation, scale, shift
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NOT_AGAIN)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NOT_AGAIN)


_NOT_AGAIN = (
    "gn_triton.group_norm: the gradient of a single torch.func.grad (kernels) cannot be differentiated again "
    "outside torch.func; nest torch.func transforms instead (grad(grad(f)), torch.func.hessian), or use "
    "torch.autograd.grad(..., create_graph=True)"
)


class _Opaque:
    """A value torch.func passes through as one leaf."""

    def __init__(self, value) -> None:
        self.value = value


def _backward_twice_raises(grad_out, input, weight, bias, mean, mean_lo, rstd, num_groups, mask, activation, scale,
                           shift):  # fmt: skip
    spec = _Opaque((num_groups, tuple(mask), activation))
    return _Backward.apply(grad_out, input, weight, bias, mean, mean_lo, rstd, scale, shift, spec)


def _torch_backward(grad_out, saved, num_groups: int, eps: float, activation, needs) -> tuple:
    """(dx, dweight, dbias, dscale, dshift) in differentiable torch ops (None where not in `needs` or the
    tensor is None): the backward when a graph of the gradients is being built (create_graph=True,
    torch.func.grad), so that it can be differentiated again. With <.> the mean over a group:
        dz = act'(z)*dy,  du = dz*(1 + s),  dx = r*(d_hat - <d_hat> - x_hat*<d_hat*x_hat>), d_hat = du*w,
        dw = sum(du*x_hat),  db = sum(du),  ds = sum(dz*u),  dt = sum(dz).
    The statistics are taken again here, differentiably (the saved ones are constants to autograd)."""
    input, weight, bias, scale, shift = saved
    f = _Differentiable(input, num_groups, eps)
    acc, channel, sample, rstd, x_hat_rows = f.acc, f.channel, f.sample, f.rstd, f.x_hat_rows
    x_hat = x_hat_rows.reshape(input.shape)
    u = x_hat if weight is None else x_hat * channel(weight)
    u = u if bias is None else u + channel(bias)
    dz = grad_out.to(acc)
    if activation is not None:
        z = u if scale is None else u * (1 + sample(scale))
        z = z if shift is None else z + sample(shift)
        dz = _activations.ACTIVATIONS[activation].tangent(dz, z)
    du = dz if scale is None else dz * (1 + sample(scale))
    positions, all_positions = tuple(range(2, input.dim())), (0, *range(2, input.dim()))
    dx = dw = db = ds = dt = None
    if needs[0]:
        d_hat = (du if weight is None else du * channel(weight)).reshape(x_hat_rows.shape)
        h = x_hat_rows
        dx = rstd * (d_hat - d_hat.mean(-1, keepdim=True) - h * (d_hat * h).mean(-1, keepdim=True))
        dx = dx.reshape(input.shape).to(input.dtype)
    if needs[1] and weight is not None:
        dw = (du * x_hat).sum(all_positions).to(weight.dtype)
    if needs[2] and bias is not None:
        db = du.sum(all_positions).to(bias.dtype)
    if needs[3] and scale is not None:
        ds = (dz * u).sum(positions).to(scale.dtype)
    if needs[4] and shift is not None:
        dt = dz.sum(positions).to(shift.dtype)
    return dx, dw, db, ds, dt


class GroupNormFunction(torch.autograd.Function):
    """(y, mean, mean_lo, rstd) with y = activation(GroupNorm(x)*(1 + scale) + shift) and the (N, G)
    statistics (non-differentiable); gradients for x, weight, bias, scale and shift, only those
    autograd asks for, themselves differentiable when a graph of them is built. Saves x and the three
    statistics, nothing else activation-sized (the pre-activation is recomputed in the backward)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, num_groups: int, eps: float, activation=None, scale=None, shift=None,
                out_dtype=None):  # fmt: skip
        return _ops.group_norm_fwd(input, weight, bias, num_groups, eps, activation, scale, shift, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup_context(ctx, inputs, output)
        # The same tensors as for the backward: torch.func's generated vmap rule keeps one record of
        # the saved tensors' batch dimensions for both.
        input, weight, _, _, _, _, scale, shift, _ = inputs
        bias = None if ctx.bias_dtype is not None else inputs[2]  # not saved where not read
        ctx.save_for_forward(input, weight, bias, scale, shift, *output[1:])
        ctx.out_dtype = output[0].dtype

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_mean_lo, _grad_rstd):
        return _backward(ctx, grad_y)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _n, _eps, _act, d_scale, d_shift, _out_dtype):
        if _nested_forward_mode():
            raise RuntimeError(_NOT_TWICE)
        tangents = (d_input, d_weight, d_bias, d_scale, d_shift)
        y_dot = _tangent(ctx.saved_tensors, ctx.num_groups, ctx.eps, ctx.activation, tangents, ctx.out_dtype)
        return y_dot, None, None, None


def _op_backward(ctx, grad_y, _grad_mean, _grad_mean_lo, _grad_rstd):
    return _backward(ctx, grad_y)


torch.library.register_autograd(f"{_ops.NAMESPACE}::group_norm_fwd", _op_backward, setup_context=_setup_context)


# --- the plain eager route ------------------------------------------------------------------------


def eager(input: torch.Tensor) -> bool:
    """Whether a call on `input` may take the plain eager route: outside torch.compile and torch.jit.trace;
    a plain tensor on a device the kernels run on; no torch.func transform, forward-mode AD level, torch
    function mode or dispatch mode active (those see, or transform, the custom ops: they take the ops'
    route)."""
    return (
        not torch.compiler.is_compiling()
        and type(input) is torch.Tensor
        and torch._C._get_tracing_state() is None  # torch.jit.trace records the ops, not launches
        and (input.is_cuda or _checks.INTERPRET)
        and peek_interpreter_stack() is None
        and torch.autograd.forward_ad._current_level < 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def run(program: _launch.ForwardProgram, input: torch.Tensor, tensors: Sequence, eps: float) -> torch.Tensor:
    """y of a checked call on the eager route: the program alone where no gradient is needed, else
    through EagerGroupNorm. tensors: (weight, bias, scale, shift), each may be None."""
    if torch.is_grad_enabled() and (input.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        # Only the tensors there are: each argument of apply costs the autograd machinery time.
        return EagerGroupNorm.apply(input, program, eps, *[t for t in tensors if t is not None])
    return program(input, tensors, eps)[0]


class EagerGroupNorm(torch.autograd.Function):
    """y of the eager route, differentiable in reverse mode. Takes (input, program, eps, *present):
    present are those of (weight, bias, scale, shift) that are not None, in that order. Saves x, those
    and the forward's workspace (the (N, G) statistics); its backward runs the forward program's
    backward program. A bias that backward does not read (no activation, no scale) is kept unsaved, so
    that it may change in place before the backward, as with torch. With create_graph=True the
    gradients are differentiable torch ops (_torch_backward), as on the ops' route."""

    @staticmethod
    def forward(ctx, input, program: _launch.ForwardProgram, eps: float, *present):
        y, work = program(input, program.tensors(present), eps)
        ctx.program, ctx.eps, ctx.bias = program, eps, None
        if program.activation is None and 1 in program.present and 2 not in program.present:
            at = program.present.index(1)  # the bias's place in present
            ctx.bias, present = present[at], present[:at] + present[at + 1 :]
        ctx.save_for_backward(input, work, *present)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        input, work, *present = ctx.saved_tensors
        program = ctx.program
        if ctx.bias is not None:
            present.insert(program.present.index(1), ctx.bias)
        tensors, needs = program.tensors(present), program.needs(ctx.needs_input_grad)
        if torch.is_grad_enabled():  # a graph of the gradients is being built
            grads = _torch_backward(grad_y, (input, *tensors), program.num_groups, ctx.eps, program.activation, needs)
        elif _launch.meta(input) != program.key[0]:
            # A saved-tensor hook (offloading, say) gave x back in other strides or at another alignment than
            # the forward's signature: the backward keyed on the tensors as they are.
            affine = Affine(*tensors, program.activation)
            grads = _launch.gn_bwd(grad_y, input, program.num_groups, affine, *program.statistics(work), needs)
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        else:
            grads = program.backward_program(grad_y, input, tensors, work, needs)(grad_y, input, tensors, work)
        return grads[0], None, None, *(grads[1 + i] for i in program.present)
