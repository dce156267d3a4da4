"""gn_triton.GroupNorm: a drop-in for torch.nn.GroupNorm."""

from __future__ import annotations

import inspect
import warnings

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
                self.bias = None  # type: ignore[assignment]  # unregisters the parameter, as torch's own bias=False does
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

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it: say why it cannot, instead of
        # TorchScript's error about a line of gn_triton.group_norm.
        raise RuntimeError(
            "torch.jit.script cannot compile gn_triton.GroupNorm: its forward is Python that TorchScript does not "
            "take (keyword-only arguments, Triton kernels behind torch.library custom ops). Use torch.compile, or "
            "script the model before gn_triton.convert_model (gn_triton.revert_model(model) undoes it)"
        )

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

# Forwards of nn.GroupNorm subclasses known to compute exactly torch's GroupNorm forward, by qualified
# name, with the condition under which they do. timm's GroupNorm and GroupNorm1 call
# F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps) unless timm's fast_norm was on
# when they were made (then they run in autocast's lower precision: left alone).
_TORCH_EQUIVALENT_FORWARDS = {
    "timm.layers.norm.GroupNorm.forward": lambda m: not getattr(m, "_fast_norm", True),
    "timm.layers.norm.GroupNorm1.forward": lambda m: not getattr(m, "_fast_norm", True),
}


def _computes_torchs_group_norm(module: torch.nn.Module) -> bool:
    """module is an nn.GroupNorm (or subclass) whose forward is torch's GroupNorm forward."""
    forward = type(module).forward
    if forward is torch.nn.GroupNorm.forward:
        return True
    same = _TORCH_EQUIVALENT_FORWARDS.get(f"{forward.__module__}.{forward.__qualname__}")
    return same is not None and same(module)


_CONVERTED: dict[type, type] = {}  # an nn.GroupNorm subclass -> its converted class


def _new_converted(original: type) -> GroupNorm:
    """Unpickling a converted subclass instance: the converted class is made again in this process."""
    return object.__new__(_converted_class(original))


def _converted_class(cls: type) -> type:
    """The class a module of class `cls` gets: gn_triton.GroupNorm for torch's own, else a class
    deriving from gn_triton.GroupNorm and `cls` (in that order: gn_triton's forward, everything else
    of `cls`, so isinstance(module, cls) still holds), with `cls`'s name."""
    if cls is torch.nn.GroupNorm:
        return GroupNorm
    if cls not in _CONVERTED:

        def reduce_ex(self, protocol):  # pickled by its original class: the converted one has no import path
            _, args, *rest = object.__reduce_ex__(self, protocol)
            return (_new_converted, (cls,), *rest)

        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce_ex__": reduce_ex,
                     "_gn_triton_original": cls}  # fmt: skip
        _CONVERTED[cls] = type(cls.__name__, (GroupNorm, cls), namespace)
    return _CONVERTED[cls]


def _hooked(module: torch.nn.Module) -> bool:
    """Something observes module's calls: its own hooks or global module hooks."""
    from torch.nn.modules import module as nn_module

    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, k, None) or getattr(nn_module, "_global" + k, None) for k in kinds)


def _fused_activation(norm: torch.nn.Module, act: torch.nn.Module) -> str | None:
    """The kernel activation for running `act(norm(x))` as one call, or None where that could differ
    from calling the two modules (another forward, an activation already fused, hooks)."""
    if type(act) not in _FUSABLE or not isinstance(norm, GroupNorm) or type(norm).forward is not GroupNorm.forward:
        return None
    if norm.activation is not None or _hooked(norm) or _hooked(act):
        return None
    return _FUSABLE[type(act)](act)


class FusingSequential(torch.nn.Sequential):
    """An nn.Sequential (the same modules, indices and state_dict) whose forward runs each
    gn_triton.GroupNorm directly followed by nn.SiLU or nn.GELU as one fused call: what
    convert_model(activation_fusion=True) makes of a Sequential holding such a pair. The modules
    themselves are not changed, so every other use of them (another path, another Sequential, a
    slice `seq[:k]` ending at the norm) computes what it did; a pair is run unfused while either
    module has hooks (or global module hooks are set), decided at each call."""

    def forward(self, input):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            norm = modules[i]
            activation = _fused_activation(norm, modules[i + 1]) if i + 1 < len(modules) else None
            if activation is None:
                input = norm(input)
                i += 1
            else:
                input = group_norm(input, norm.num_groups, norm.weight, norm.bias, norm.eps, activation=activation,
                                   keep_input_dtype=norm.keep_input_dtype)  # fmt: skip
                i += 2
        return input


def unconverted_group_norms(model: torch.nn.Module) -> list[str]:
    """Names (as in model.named_modules(); "" for model itself) of the nn.GroupNorm modules of `model`
    that do not run gn_triton's forward: subclasses of nn.GroupNorm with a forward of their own, which
    convert_model leaves alone (and warns about)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.GroupNorm) and not isinstance(m, GroupNorm)]  # fmt: skip


def convert_model(
    model: torch.nn.Module, activation_fusion: bool = False, keep_input_dtype: bool = False
) -> torch.nn.Module:
    """Make every torch.nn.GroupNorm in `model` (nested, in ModuleLists and Sequentials), and every
    subclass of it whose forward is torch's GroupNorm forward (timm's GroupNorm and GroupNorm1), run
    gn_triton's kernels, in place, and return `model`.

    The modules keep their identity, parameters, buffers and hooks (only their class changes: an
    nn.GroupNorm becomes gn_triton.GroupNorm; a subclass becomes a class deriving from
    gn_triton.GroupNorm and itself, so isinstance checks against it still hold), so no tensor is
    copied and an optimizer built before the conversion stays valid. Subclasses with a forward of
    their own (e.g. timm's GroupNormAct) are left alone: a UserWarning names them, and
    gn_triton.modules.unconverted_group_norms(model) lists them.

    activation_fusion=True: each nn.Sequential holding a GroupNorm directly followed by nn.SiLU or
    nn.GELU becomes a FusingSequential, which runs that pair as one fused call; the norm and the
    activation modules stay as they are (indices, state_dict keys and every other use unchanged), and
    a pair with hooks on either module runs unfused. keep_input_dtype=True sets that attribute of each
    converted module: under CUDA autocast it returns the input's dtype, not torch's fp32.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm) and not isinstance(module, GroupNorm):
            if _computes_torchs_group_norm(module):
                module.__class__ = _converted_class(type(module))
                # (torch types a Module's attributes it does not declare as Tensor | Module)
                module.activation = None  # type: ignore[assignment]
                if keep_input_dtype:
                    module.keep_input_dtype = True  # type: ignore[assignment]
    left = unconverted_group_norms(model)
    if left:
        kinds = sorted({type(m).__qualname__ for name, m in model.named_modules() if name in left})
        warnings.warn(
            f"convert_model(): {len(left)} nn.GroupNorm subclass module(s) with a forward of their own left on "
            f"torch ({', '.join(kinds)}): {', '.join(repr(n) for n in left)}",
            stacklevel=2,
        )
    if activation_fusion:
        for seq in model.modules():
            if type(seq) is torch.nn.Sequential and any(_fused_activation(a, b) for a, b in zip(seq, seq[1:])):  # type: ignore[call-overload]  # seq[1:] is a Sequential
                seq.__class__ = FusingSequential
    return model


def revert_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo convert_model in place: converted modules get their original class back (torch.nn.GroupNorm
    or the subclass they had), FusingSequentials become nn.Sequential again. Returns `model`."""
    for module in model.modules():
        if type(module) is FusingSequential:
            module.__class__ = torch.nn.Sequential  # type: ignore[assignment]  # the class changes in place
        elif type(module) is GroupNorm or type(module) in _CONVERTED.values():
            if module.activation is not None:
                raise ValueError(
                    f"revert_model(): {module} has a fused activation (activation={module.activation!r}), which "
                    "torch.nn.GroupNorm cannot hold; revert it by hand (e.g. nn.Sequential(nn.GroupNorm, activation))"
                )
            del module.activation
            module.__dict__.pop("keep_input_dtype", None)
            module.__class__ = getattr(type(module), "_gn_triton_original", torch.nn.GroupNorm)
    return model
