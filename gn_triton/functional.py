"""gn_triton.group_norm: a drop-in for torch.nn.functional.group_norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _activations, _checks, _launch, _ops, autograd
from ._plan import Affine
from .autograd import GroupNormFunction

# torch's own form of each fused activation (the CPU fallback; also what peers are timed with).
TORCH_ACTIVATIONS = {name: a.torch for name, a in _activations.ACTIVATIONS.items()}


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
    keep_input_dtype: bool = False,
) -> torch.Tensor:
    """Group Normalization over (N, C, *) input, with torch.nn.functional.group_norm's signature
    and semantics: each of the num_groups groups of C/num_groups channels of a sample is normalised
    by its own mean and (biased) variance, then scaled by weight[c] and shifted by bias[c].

    CUDA tensors run gn_triton's Triton kernels. CPU tensors run the same kernels in Triton's
    interpreter when TRITON_INTERPRET=1 was set before import; otherwise they fall back to torch's
    own group_norm, so a model using gn_triton still runs on a CPU (gn_triton.backend_for(input)
    says which of the three a call runs).

    Keyword-only extensions (not in torch's signature), fused into the same pass:
      scale, shift: per-sample (N, C) modulation, the diffusion "scale-shift norm":
          y = GroupNorm(x)*(1 + scale) + shift, with gradients for both;
      activation: None, "silu", "gelu" or "gelu_tanh", applied last (GN+SiLU costs what GN costs);
          its backward recomputes the pre-activation instead of storing it;
      keep_input_dtype: under CUDA autocast, return input's dtype instead of torch's fp32 (see below).

    The output has input's dtype and memory format (contiguous or channels_last), except under
    autocast, which gn_triton follows as torch does: CUDA autocast runs group_norm in fp32, so 16-bit
    input gives an fp32 output (the kernels read the 16-bit input and write fp32; no fp32 copy of the
    input is made), while CPU autocast leaves the input's dtype. keep_input_dtype=True opts out: the
    output keeps input's dtype (half the output bytes), as outside autocast. weight, bias, scale and
    shift may be of another floating dtype than input (e.g. fp32 parameters with bf16 input) and of
    any strides; statistics are fp32 (fp64 for fp64 input). Bad arguments raise torch's exception
    types, naming the argument. Differentiable in reverse and forward mode, and under torch.func
    transforms (grad, vjp, jacrev, jacfwd, jvp, vmap); twice too (double backward, grad of grad,
    hessian: the backward in torch ops while a graph of the gradients is built), except forward mode
    over forward mode, which raises.
    """
    if type(num_groups) is not int or type(eps) is not float:  # numpy numbers, 0-d tensors: as torch takes them
        num_groups, eps = _checks.as_number(num_groups, int), _checks.as_number(eps, float)
    if autograd.eager(input):
        out_dtype: torch.dtype | None = input.dtype if keep_input_dtype else _checks.output_dtype(input)
        tensors = (weight, bias, scale, shift)
        program = _eager_program(input, num_groups, tensors, eps, activation, out_dtype)
        if program is not None:
            return autograd.run(program, input, tensors, eps)
    if has_torch_function_variadic(input, weight, bias, scale, shift):  # fx proxies, torch function modes
        return handle_torch_function(
            group_norm, (input, weight, bias, scale, shift), input, num_groups, weight, bias, eps,
            activation=activation, scale=scale, shift=shift, keep_input_dtype=keep_input_dtype,
        )  # fmt: skip
    _check(input, num_groups, weight, bias, eps, activation, scale, shift)
    out_dtype = input.dtype if keep_input_dtype else _checks.output_dtype(input)
    # torch.func transforms inside torch.compile: Dynamo runs the ops' autograd under the transform,
    # which torch.library's autograd registration does not support; torch's ops, for Inductor to fuse.
    # (Under Dynamo, peek_interpreter_stack() does not say whether a transform is active; this does.)
    compiled_transform = torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if compiled_transform or _checks.backend_for(input) == "torch":
        y = _torch_group_norm(input, num_groups, weight, bias, float(eps))
        return _torch_epilogue(y, activation, scale, shift).to(out_dtype)
    args = (input, weight, bias, num_groups, float(eps), activation, scale, shift)
    out_dtype = None if out_dtype == input.dtype else out_dtype
    if torch.compiler.is_compiling():
        # Dynamo traces no autograd.Function with a custom jvp: the op, differentiated by the formula
        # registered on it (reverse mode only, as in every compiled graph).
        return _ops.group_norm_fwd(*args, out_dtype)[0]
    return GroupNormFunction.apply(*args, out_dtype)[0]


# The signatures of calls that passed the argument checks, with their launch program: a call with the
# same signature passes them again (the key holds every type, shape, dtype and device they look at).
_CHECKED: dict[tuple, _launch.ForwardProgram] = {}


def _eager_program(input, num_groups, tensors, eps, activation, out_dtype) -> _launch.ForwardProgram | None:
    """The eager route's launch program for this call: planned at the first call of its signature,
    after the argument checks (which raise on bad arguments); None where the call does not run on the
    kernels (empty input, a dtype or device they do not take)."""
    key: tuple | None
    program: _launch.ForwardProgram | None
    try:
        key = (_launch.signature(input, num_groups, tensors, activation, out_dtype), type(num_groups), type(eps))
        program = _CHECKED.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable: the checks say what is wrong
        key = program = None
    if program is None:
        weight, bias, scale, shift = tensors
        _check(input, num_groups, weight, bias, eps, activation, scale, shift)
        if key is not None and input.numel() and _checks.backend_for(input) != "torch":
            affine = Affine(weight, bias, scale, shift, activation)
            program = _launch.forward_program(input, num_groups, float(eps), affine, out_dtype, key[0])
            _launch.keep(_CHECKED, key, program, input.device)
    return program


def _check(input, num_groups, weight, bias, eps, activation, scale, shift) -> None:
    _checks.check_group_norm_args(input, num_groups, weight, bias, eps)
    _checks.check_activation(activation)
    _checks.check_modulation(input, scale, shift)


def _torch_group_norm(input, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """torch's group_norm with gn_triton's behaviour where torch's CPU kernel differs: a bias without a
    weight (that kernel's backward fails on it), parameters of another dtype than input (it refuses
    most mixes: they are cast exactly, to input's dtype or, for 16-bit input, to fp32), and empty
    input, whose parameters get zero gradients (NaN from that kernel)."""
    C = input.shape[1]
    target = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    weight, bias = (p if p is None or p.dtype == input.dtype else p.to(target) for p in (weight, bias))
    if weight is None and bias is not None:
        weight = torch.ones(C, dtype=bias.dtype, device=bias.device)
    if input.numel() == 0:  # no statistics to take: the affine alone (empty), whose gradients are zero
        per_channel = (1, C, *[1] * (input.dim() - 2))
        y = input.clone() if weight is None else input * weight.reshape(per_channel)  # a new tensor, as torch
        return (y if bias is None else y + bias.reshape(per_channel)).to(input.dtype)
    return F.group_norm(input, num_groups, weight, bias, eps)


def _torch_epilogue(y: torch.Tensor, activation: str | None, scale, shift) -> torch.Tensor:
    """The fallback path's modulation and activation, in torch ops."""
    per_channel = (*y.shape[:2], *([1] * (y.dim() - 2)))
    if scale is not None:
        y = y * (1 + scale.reshape(per_channel))
    if shift is not None:
        y = y + shift.reshape(per_channel)
    return y if activation is None else TORCH_ACTIVATIONS[activation](y)
