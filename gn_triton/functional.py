"""gn_triton.group_norm: a drop-in for torch.nn.functional.group_norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from .autograd import GroupNormFunction

# torch's own form of each fused activation (the CPU fallback; also what peers are timed with).
TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group Normalization over (N, C, *) input, with torch.nn.functional.group_norm's signature
    and semantics: each of the num_groups groups of C/num_groups channels of a sample is normalised
    by its own mean and (biased) variance, then scaled by weight[c] and shifted by bias[c].

    CUDA tensors run gn_triton's Triton kernels. CPU tensors run the same kernels in Triton's
    interpreter when TRITON_INTERPRET=1 was set before import; otherwise they fall back to torch's
    own group_norm, so a model using gn_triton still runs on a CPU.

    Keyword-only extensions (not in torch's signature), fused into the same pass:
      scale, shift: per-sample (N, C) modulation, the diffusion "scale-shift norm":
          y = GroupNorm(x)*(1 + scale) + shift, with gradients for both;
      activation: None, "silu", "gelu" or "gelu_tanh", applied last (GN+SiLU costs what GN costs);
          its backward recomputes the pre-activation instead of storing it.

    The output has input's dtype and memory format (contiguous or channels_last). weight and bias
    may be of another floating dtype than input (e.g. fp32 parameters with bf16 input); statistics
    are fp32 (fp64 for fp64 input). Bad arguments raise like torch, naming the argument.
    """
    _checks.check_group_norm_args(input, num_groups, weight, bias)
    _checks.check_activation(activation)
    _checks.check_modulation(input, scale, shift)
    if input.dtype not in _checks.SUPPORTED_DTYPES or not _checks.runs_on_kernels(input):
        return _torch_epilogue(F.group_norm(input, num_groups, weight, bias, eps), activation, scale, shift)
    return GroupNormFunction.apply(input, weight, bias, num_groups, float(eps), activation, scale, shift)


def _torch_epilogue(y: torch.Tensor, activation: str | None, scale, shift) -> torch.Tensor:
    """The fallback path's modulation and activation, in torch ops."""
    per_channel = (*y.shape[:2], *([1] * (y.dim() - 2)))
    if scale is not None:
        y = y * (1 + scale.reshape(per_channel))
    if shift is not None:
        y = y + shift.reshape(per_channel)
    return y if activation is None else TORCH_ACTIVATIONS[activation](y)
