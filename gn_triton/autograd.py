"""autograd.Function tying the forward and backward ops together, and the same backward
registered on the forward op itself (torch.library.register_autograd), so a graph that calls
`gn_triton::group_norm_fwd` directly (what the torch.compile fusion pass inserts) differentiates
through gn_triton's backward op."""

from __future__ import annotations

import torch

from . import _ops


def _save(ctx, input, weight, bias, num_groups: int, activation, scale, shift, mean, mean_lo, rstd) -> None:
    ctx.save_for_backward(input, weight, bias, scale, shift, mean, mean_lo, rstd)
    ctx.num_groups = num_groups
    ctx.activation = activation


def _backward(ctx, grad_out):
    """Gradients of (input, weight, bias, num_groups, eps, activation, scale, shift): the argument
    order of both GroupNormFunction.apply and the forward op. (The dispatcher drops an op call's
    trailing arguments that equal their defaults: then fewer are asked for, and returned.)"""
    input, weight, bias, scale, shift, mean, mean_lo, rstd = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)
    needs = (*ctx.needs_input_grad, *[False] * (8 - n_inputs))
    mask = [needs[0], needs[1], needs[2], needs[6], needs[7]]
    dx, dw, db, dscale, dshift = _ops.group_norm_bwd(
        grad_out, input, weight, bias, mean, mean_lo, rstd, ctx.num_groups, mask, ctx.activation, scale, shift
    )
    dx, dw, db, dscale, dshift = (g if m else None for g, m in zip((dx, dw, db, dscale, dshift), mask))
    return (dx, dw, db, None, None, None, dscale, dshift)[:n_inputs]


class GroupNormFunction(torch.autograd.Function):
    """y = activation(GroupNorm(x)*(1 + scale) + shift) with gradients for x, weight, bias, scale
    and shift; only what autograd asks for is computed. Saves x and three (N, G) statistics, nothing
    else activation-sized (the pre-activation is recomputed in the backward). Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_groups: int, eps: float, activation=None, scale=None, shift=None):
        y, mean, mean_lo, rstd = _ops.group_norm_fwd(input, weight, bias, num_groups, eps, activation, scale, shift)
        _save(ctx, input, weight, bias, num_groups, activation, scale, shift, mean, mean_lo, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def _op_setup_context(ctx, inputs, output) -> None:
    input, weight, bias, num_groups, _eps, activation, scale, shift = inputs
    _y, mean, mean_lo, rstd = output
    ctx.mark_non_differentiable(mean, mean_lo, rstd)  # statistics: outputs for the backward only
    _save(ctx, input, weight, bias, num_groups, activation, scale, shift, mean, mean_lo, rstd)


def _op_backward(ctx, grad_y, _grad_mean, _grad_mean_lo, _grad_rstd):
    return _backward(ctx, grad_y)


torch.library.register_autograd("gn_triton::group_norm_fwd", _op_backward, setup_context=_op_setup_context)
