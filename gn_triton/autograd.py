"""autograd.Function tying the forward and backward ops together."""

from __future__ import annotations

import torch

from . import _ops


class GroupNormFunction(torch.autograd.Function):
    """y = activation(GroupNorm(x)) with gradients for x, weight and bias; only what autograd asks
    for is computed. Saves x and three (N, G) statistics, nothing else activation-sized (the
    pre-activation is recomputed in the backward). Not twice differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_groups: int, eps: float, activation: str | None = None):
        y, mean, mean_lo, rstd = _ops.group_norm_fwd(input, weight, bias, num_groups, eps, activation)
        ctx.save_for_backward(input, weight, bias, mean, mean_lo, rstd)
        ctx.num_groups = num_groups
        ctx.activation = activation
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, mean, mean_lo, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = _ops.group_norm_bwd(
            grad_out, input, weight, bias, mean, mean_lo, rstd, ctx.num_groups, mask, ctx.activation
        )
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None)
