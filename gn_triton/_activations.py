"""The fused activations, one row each. A new activation is a row here, its forward and derivative in
kernels/_tile.py (`activation`, `activation_grad`) under the row's number, and its name in
tests/cases.py; convert_model's module table (modules.py) and the compile pass (compile_fusion.py)
take it up only if an nn module or a torch op should map to it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    number: int  # the kernels' Epilogue.ACTIVATION
    torch: Callable  # torch's form: the CPU fallback, the perf peers
    tangent: Callable  # (dz, z) -> act'(z)*dz in differentiable torch ops: forward-mode AD
    reference: Callable  # float64, from elementary ops: gn_triton.reference


def _silu_tangent(dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # aten's silu_backward has no derivative of its own: written out, so that reverse over forward works
    sig = torch.sigmoid(z)
    return dz * sig * (1 + z * (1 - sig))


ACTIVATIONS = {
    "silu": Activation(1, F.silu, _silu_tangent, lambda y: y / (1 + torch.exp(-y))),
    "gelu": Activation(2, F.gelu, lambda dz, z: torch.ops.aten.gelu_backward(dz, z),
                       lambda y: 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))),
    "gelu_tanh": Activation(3, lambda y: F.gelu(y, approximate="tanh"),
                            lambda dz, z: torch.ops.aten.gelu_backward(dz, z, approximate="tanh"),
                            lambda y: 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))),
}  # fmt: skip
