"""Layers for the Hugging Face `kernels` package's `kernelize`: each replaces the forward of a model's
own layer with gn_triton's, keeping the module, its parameters and its state_dict.

    from kernels import LayerRepository, Mode, kernelize, register_kernel_mapping, replace_kernel_forward_from_hub

    replace_kernel_forward_from_hub(torch.nn.GroupNorm, "GroupNorm")  # every nn.GroupNorm is kernelizable
    repo = LayerRepository("ORG/gn-triton", layer_name="GroupNorm", version=1)
    register_kernel_mapping({"GroupNorm": {"cuda": repo, "rocm": repo}})
    model = kernelize(model, mode=Mode.INFERENCE)

`GroupNorm` takes the forward of `nn.GroupNorm` (or of any layer with its attributes num_groups, weight,
bias and eps that computes what it computes). `GroupNormSiLU` takes the forward of a layer with those
attributes that computes SiLU(GroupNorm(x)) in one forward (a model's own fused norm class, marked with
`use_kernel_forward_from_hub("GroupNormSiLU")`), and runs it as one fused call.

`kernels` binds the forward to the model's module, so these classes hold nothing but `forward` and the
two flags `kernelize` reads: both support backward (Mode.TRAINING) and torch.compile
(Mode.TORCH_COMPILE: gn_triton's ops are torch.library custom ops). Where gn_triton does not run a call
(backend_for(input) == "torch": a device other than CUDA, a CPU without Triton's interpreter, a dtype
the kernels do not take), the forward is torch's own F.group_norm (then F.silu), exactly the model's
original computation, errors included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import backend_for
from .functional import group_norm


class _Layer(torch.nn.Module):
    """What both layers declare: nn.GroupNorm's attributes they run with (annotations only, no members of
    their own: `kernels` refuses a layer with members besides forward and the two flags) and the flags."""

    num_groups: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    has_backward = True
    can_torch_compile = True


class GroupNorm(_Layer):
    """nn.GroupNorm's forward on gn_triton's kernels; torch's own where they do not run the call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if backend_for(input) == "torch":
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormSiLU(_Layer):
    """SiLU(GroupNorm(x)) of a layer with nn.GroupNorm's attributes, as one fused gn_triton call;
    torch's F.group_norm then F.silu where the kernels do not run the call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if backend_for(input) == "torch":
            return F.silu(F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps))
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation="silu")
