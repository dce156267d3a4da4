"""gn_triton.GroupNorm: a drop-in for torch.nn.GroupNorm."""

from __future__ import annotations

import torch

from . import _launch
from .functional import group_norm


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm whose forward runs gn_triton's kernels.

    Same constructor, parameters, initialisation, state_dict and repr as torch.nn.GroupNorm (it is
    a subclass), so a torch checkpoint loads into it and back, and isinstance(m, torch.nn.GroupNorm)
    holds. The keyword-only `activation` ("silu", "gelu", "gelu_tanh") fuses that activation into
    the same pass: the module then computes what nn.Sequential(nn.GroupNorm, activation) does, with
    the state_dict of a plain GroupNorm.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        _launch.check_activation(activation)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra if self.activation is None else f"{extra}, activation={self.activation!r}"
