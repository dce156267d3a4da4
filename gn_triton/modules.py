"""gn_triton.GroupNorm: a drop-in for torch.nn.GroupNorm."""

from __future__ import annotations

import torch

from .functional import group_norm


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm whose forward runs gn_triton's kernels.

    Same constructor, parameters, initialisation, state_dict and repr as torch.nn.GroupNorm (it is
    a subclass and overrides only forward), so a torch checkpoint loads into it and back, and
    isinstance(m, torch.nn.GroupNorm) holds.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
