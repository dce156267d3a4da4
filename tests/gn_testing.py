"""Helpers shared by the tests: inputs, forward+backward runs, and the reference comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gn_triton
from gn_triton.reference import TOLERANCE, group_norm_reference
from gn_triton.reference import relative_error as error


def make_input(shape, dtype=torch.float32, device="cpu", offset=0.0, scale=1.0, layout="contiguous"):
    """Fresh random input (never zeros), mean-shifted by `offset`, in the given memory layout:
    contiguous, channels_last (4-D/5-D), sliced (a strided view of a larger tensor) or permuted."""
    if layout == "sliced":
        big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, device=device)
        return (big * scale + offset).to(dtype)[..., ::2]
    x = (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "permuted":  # channels moved last in memory, for any rank
        perm = (0, *range(2, len(shape)), 1)
        inverse = [perm.index(i) for i in range(len(shape))]
        return x.permute(perm).contiguous().permute(inverse)
    assert layout == "contiguous", layout
    return x


def make_params(C, dtype=torch.float32, device="cpu", weight=True, bias=True):
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).to(dtype) if weight else None
    b = torch.randn(C, dtype=torch.float64, device=device).to(dtype) if bias else None
    return w, b


def forward_backward(fn, x, num_groups, weight, bias, dy, eps=1e-5, dtype=None):
    """Run fn(x, num_groups, weight, bias, eps) on fresh leaf copies (cast to `dtype` if given) and
    backpropagate dy. Returns (y, dx, dweight, dbias); the callers' tensors are never touched."""

    def leaf(t):
        if t is None:
            return None
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        return t.requires_grad_()

    x_, w_, b_ = leaf(x), leaf(weight), leaf(bias)
    y = fn(x_, num_groups, w_, b_, eps)
    y.backward(dy if dtype is None else dy.to(dtype))
    return y.detach(), x_.grad, None if w_ is None else w_.grad, None if b_ is None else b_.grad


def kernel_eps(eps: float) -> float:
    """eps as the kernels apply it: a runtime fp32 scalar (documented; matters only for fp64 input)."""
    return torch.tensor(eps, dtype=torch.float32).item()


def reference(x, num_groups, weight, bias, dy, eps=1e-5):
    if x.dtype == torch.float64:
        eps = kernel_eps(eps)
    return forward_backward(group_norm_reference, x, num_groups, weight, bias, dy, eps, dtype=torch.float64)


def torch_errors(x, num_groups, weight, bias, dy, ref, eps=1e-5):
    """torch's own errors at x's dtype (forward, dx, dweight, dbias), for the 16-bit tolerance."""
    C = x.shape[1]
    w = weight if weight is not None else torch.ones(C, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else torch.zeros(C, dtype=x.dtype, device=x.device)
    outs = forward_backward(F.group_norm, x, num_groups, w, b, dy, eps)
    return [error(o, r) if r is not None else 0.0 for o, r in zip(outs, ref)]


def assert_matches_reference(x, num_groups, weight=None, bias=None, dy=None, eps=1e-5):
    """gn_triton's forward and gradients against the float64 reference; output dtype and memory
    format against torch's. 16-bit: error <= 2x torch's own error at that dtype + a small floor."""
    if dy is None:
        dy = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    ours = forward_backward(gn_triton.group_norm, x, num_groups, weight, bias, dy, eps)
    ref = reference(x, num_groups, weight, bias, dy, eps)
    tol = [TOLERANCE[x.dtype]] * 4
    if x.dtype in (torch.float16, torch.bfloat16):
        tol = [2 * e + t for e, t in zip(torch_errors(x, num_groups, weight, bias, dy, ref, eps), tol)]
    for name, out, r, t in zip(("y", "dx", "dweight", "dbias"), ours, ref, tol):
        if r is None:
            assert out is None, name
            continue
        err = error(out, r)
        assert err <= t, f"{name}: error {err:.3g} > tolerance {t:.3g} (shape {tuple(x.shape)}, {x.dtype})"
    y, dx, dw, db = ours
    torch_y = F.group_norm(x, num_groups, weight, bias, eps)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.shape == x.shape and dx.shape == x.shape
    fmt = torch._prims_common.suggest_memory_format(torch_y)
    assert y.is_contiguous(memory_format=fmt), f"output strides {y.stride()} but torch gives {torch_y.stride()}"
    if weight is not None:
        assert dw.dtype == weight.dtype
    if bias is not None:
        assert db.dtype == bias.dtype
    return ours
