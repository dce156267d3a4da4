"""The kernels as torch.library custom ops, so torch.compile and torch.export trace them without
graph breaks.

Each op has a fake (meta) implementation that allocates on the input's device with the real op's
shapes, dtypes and memory format.

Both ops are tagged flexible_layout: they read any strides (channels_last natively), so Inductor
passes its own layout (e.g. the channels_last output of a convolution it chose) instead of copying
the activation into the strides of the eager trace first.
"""

from __future__ import annotations

import torch

from . import _launch
from ._plan import Affine

_FLEXIBLE = (torch.Tag.flexible_layout,)


@torch.library.custom_op("gn_triton::group_norm_fwd", mutates_args=(), tags=_FLEXIBLE)
def group_norm_fwd(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, mean_lo, rstd): y = activation((GroupNorm(input)*(1 + scale) + shift) in input's dtype
    and memory format; (N, G) statistics in fp32 (fp64 for fp64 input), the mean as the pair
    mean + mean_lo."""
    return _launch.gn_fwd(input, num_groups, eps, Affine(weight, bias, scale, shift, activation))


@group_norm_fwd.register_fake
def _(input, weight, bias, num_groups, eps, activation=None, scale=None, shift=None):
    return _launch.empty_outputs(input, num_groups)


@torch.library.custom_op("gn_triton::group_norm_bwd", mutates_args=(), tags=_FLEXIBLE)
def group_norm_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    mean_lo: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    output_mask: list[bool],
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dscale, dshift); a gradient not in `output_mask` (or of a None tensor) is
    empty. With a fused activation its pre-activation is recomputed from input and the statistics."""
    affine = Affine(weight, bias, scale, shift, activation)
    return _launch.gn_bwd(grad_out, input, num_groups, affine, mean, mean_lo, rstd, output_mask)


@group_norm_bwd.register_fake
def _(grad_out, input, weight, bias, mean, mean_lo, rstd, num_groups, output_mask, activation=None, scale=None,
      shift=None):  # fmt: skip
    return _launch.empty_grads(input, Affine(weight, bias, scale, shift), output_mask)
