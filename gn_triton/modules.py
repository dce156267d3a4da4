"""gn_triton.GroupNorm: a drop-in for torch.nn.GroupNorm."""

from __future__ import annotations

import inspect

import torch

from . import _checks
from .functional import group_norm

# torch.nn.GroupNorm gained its keyword-only `bias` after torch 2.11: where it is missing, GroupNorm
# drops the bias itself, so bias=False gives the same module (parameters, state_dict, repr) everywhere.
_TORCH_TAKES_BIAS = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm whose forward runs gn_triton's kernels.

    Same constructor, parameters, initialisation, state_dict and repr as torch.nn.GroupNorm (it is
    a subclass), so a torch checkpoint loads into it and back, and isinstance(m, torch.nn.GroupNorm)
    holds. The keyword-only `activation` ("silu", "gelu", "gelu_tanh") fuses that activation into
    the same pass: the module then computes what nn.Sequential(nn.GroupNorm, activation) does, with
    the state_dict of a plain GroupNorm.

    Under CUDA autocast the output is fp32 for 16-bit input, as torch's; setting the attribute
    `keep_input_dtype = True` (or convert_model(..., keep_input_dtype=True)) keeps the input's dtype
    instead (gn_triton.group_norm's keep_input_dtype).
    """

    keep_input_dtype: bool = False  # a class default: convert_model's modules have it without __init__

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
        if _TORCH_TAKES_BIAS:
            super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        else:
            super().__init__(num_groups, num_channels, eps, affine, device, dtype)
            if affine and not bias:
                self.bias = None  # unregisters the parameter, as torch's own bias=False does
        _checks.check_activation(activation)
        self.activation = activation

    def forward(
        self, input: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """GroupNorm of input; optional per-sample (N, C) scale and shift: y*(1 + scale) + shift,
        before the activation."""
        return group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation, scale=scale,
            shift=shift, keep_input_dtype=self.keep_input_dtype,
        )  # fmt: skip

    def reset_parameters(self) -> None:
        if _TORCH_TAKES_BIAS or self.bias is not None:
            super().reset_parameters()
        elif self.affine:
            torch.nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if not _TORCH_TAKES_BIAS and self.affine and self.bias is None:
            extra += ", bias=False"
        extra = extra if self.activation is None else f"{extra}, activation={self.activation!r}"
        return f"{extra}, keep_input_dtype=True" if self.keep_input_dtype else extra


# Activation modules convert_model can fuse, and the kernel activation each one is.
_FUSABLE = {
    torch.nn.SiLU: lambda m: "silu",
    torch.nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu",
}


class FusedIntoGroupNorm(torch.nn.Identity):
    """Placeholder left where convert_model(activation_fusion=True) took an activation into the
    GroupNorm before it; revert_model puts the original activation module back."""

    def __init__(self, original: torch.nn.Module) -> None:
        super().__init__()
        self._original = (original,)  # a tuple: kept, but not registered as a submodule

    def extra_repr(self) -> str:
        return f"fused: {self._original[0]}"


def convert_model(
    model: torch.nn.Module, activation_fusion: bool = False, keep_input_dtype: bool = False
) -> torch.nn.Module:
    """Make every torch.nn.GroupNorm in `model` (nested, in ModuleLists and Sequentials) a
    gn_triton.GroupNorm, in place, and return `model`.

    The modules keep their identity, parameters, buffers and hooks (only their class changes), so
    no tensor is copied and an optimizer built before the conversion stays valid. With
    activation_fusion=True, a GroupNorm directly followed by nn.SiLU or nn.GELU inside an
    nn.Sequential takes that activation into its kernel, and the activation's slot holds a
    FusedIntoGroupNorm placeholder (indices and state_dict keys are unchanged). Subclasses of
    nn.GroupNorm with their own forward are left alone. keep_input_dtype=True sets that attribute of
    each converted module: under CUDA autocast it returns the input's dtype, not torch's fp32.
    """
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = GroupNorm
            module.activation = None
            if keep_input_dtype:
                module.keep_input_dtype = True
    if activation_fusion:
        for seq in model.modules():
            if not isinstance(seq, torch.nn.Sequential):
                continue
            for i in range(len(seq) - 1):
                norm, act = seq[i], seq[i + 1]
                if type(norm) is GroupNorm and norm.activation is None and type(act) in _FUSABLE:
                    norm.activation = _FUSABLE[type(act)](act)
                    seq[i + 1] = FusedIntoGroupNorm(act)
    return model


def revert_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo convert_model in place: gn_triton.GroupNorm modules become torch.nn.GroupNorm again and
    fused activations go back to their own modules. Returns `model`."""
    for seq in model.modules():
        if isinstance(seq, torch.nn.Sequential):
            for i in range(1, len(seq)):
                if isinstance(seq[i], FusedIntoGroupNorm):
                    seq[i] = seq[i]._original[0]
                    seq[i - 1].activation = None
    for module in model.modules():
        if type(module) is GroupNorm:
            if module.activation is not None:
                raise ValueError(
                    f"revert_model(): {module} has a fused activation with no placeholder to restore it into; "
                    "revert it by hand (e.g. nn.Sequential(nn.GroupNorm, activation))"
                )
            del module.activation
            module.__dict__.pop("keep_input_dtype", None)
            module.__class__ = torch.nn.GroupNorm
    return model
