"""autograd.Function tying the forward and backward ops together."""

from __future__ import annotations

import torch

from . import _ops


class GroupNormFunction(torch.autograd.Function):
    """y = activation(GroupNorm(x)*(1 + scale) + shift) with gradients for x, weight, bias, scale
    and shift; only what autograd asks for is computed. Saves x and three (N, G) statistics, nothing
    else activation-sized (the pre-activation is recomputed in the backward). Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_groups: int, eps: float, activation=None, scale=None, shift=None):
        y, mean, mean_lo, rstd = _ops.group_norm_fwd(input, weight, bias, num_groups, eps, activation, scale, shift)
        ctx.save_for_backward(input, weight, bias, scale, shift, mean, mean_lo, rstd)
        ctx.num_groups = num_groups
        ctx.activation = activation
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, scale, shift, mean, mean_lo, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], needs[6], needs[7]]
        dx, dw, db, dscale, dshift = _ops.group_norm_bwd(
            grad_out, input, weight, bias, mean, mean_lo, rstd, ctx.num_groups, mask, ctx.activation, scale, shift
        )
        dx, dw, db, dscale, dshift = (g if m else None for g, m in zip((dx, dw, db, dscale, dshift), mask))
        return dx, dw, db, None, None, None, dscale, dshift
