"""Plain-PyTorch GroupNorm in float64, written from elementary ops (not torch's kernel).

The ground truth of the tests, the perf harness's output check and the notebooks. Autograd through
it gives the reference gradients.
"""

from __future__ import annotations

import math

import torch

from ._activations import ACTIVATIONS

# Tolerances of gn_triton's results against this reference, relative to max(1, max|reference|).
# 16-bit dtypes are judged against torch's own error at that dtype (2x it), plus this floor.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def group_norm_reference(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of `input`, then the per-sample (N, C) `scale`/`shift` (y*(1 + scale) + shift) and
    `activation` (None, "silu", "gelu", "gelu_tanh"), computed in float64; returns float64
    (differentiable)."""
    x = input.double()
    N, C = x.shape[:2]
    rows = x.reshape(N, num_groups, -1)
    count = rows.shape[-1]
    mean = rows.sum(-1, keepdim=True) / count
    centered = rows - mean
    var = (centered * centered).sum(-1, keepdim=True) / count
    y = (centered / torch.sqrt(var + eps)).reshape(x.shape)
    channel_shape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(channel_shape)
    if bias is not None:
        y = y + bias.double().reshape(channel_shape)
    sample_shape = (N, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.double().reshape(sample_shape))
    if shift is not None:
        y = y + shift.double().reshape(sample_shape)
    return y if activation is None else ACTIVATIONS[activation].reference(y)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max(1, max|ref|), NaN-aware: a NaN where the reference has none is an
    infinite error (a poisoned element a kernel never wrote)."""
    out = out.double()
    ref = ref.double()
    if torch.isnan(out).ne(torch.isnan(ref)).any():
        return math.inf
    finite = ~torch.isnan(ref)
    if not finite.any():
        return 0.0
    return ((out - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1)).item()
