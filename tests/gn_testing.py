"""Helpers shared by the tests: inputs, forward+backward runs, torch's own result, and the one
comparison with the float64 reference (assert_matches_reference)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from cases import PLANS, SIXTEEN_BIT

import gn_triton
from gn_triton import _launch, _tuning
from gn_triton.reference import TOLERANCE, group_norm_reference
from gn_triton.reference import relative_error as error

OUTPUTS = ("y", "dx", "dweight", "dbias", "dscale", "dshift")

# torch's form of each fused activation, kept apart from gn_triton's own table (gn_triton._activations,
# which its CPU fallback reads) so that the fallback is compared with something it does not share.
TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def torch_epilogue(y, activation=None, scale=None, shift=None):
    """y*(1 + scale) + shift per (n, c), then the activation, in torch's own ops (written here, not
    taken from gn_triton)."""
    per_channel = (*y.shape[:2], *([1] * (y.dim() - 2)))
    if scale is not None:
        y = y * (1 + scale.reshape(per_channel))
    if shift is not None:
        y = y + shift.reshape(per_channel)
    return y if activation is None else TORCH_ACTIVATIONS[activation](y)


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


def laid_out(t, layout="contiguous"):
    """t's values as a view of cases.PARAM_LAYOUTS' kind: contiguous; strided (every other element of
    a larger tensor); stride 0 (the first row or element expanded: the values repeat); transposed
    (a transposed tensor, or for a vector a column of one); chunk (the second half of a torch.chunk)."""
    if layout == "contiguous":
        return t
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "stride 0":
        return t[:1].expand(t.shape)
    if layout == "transposed":
        return t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], 1)[:, 0]
    assert layout == "chunk", layout
    return torch.cat([torch.zeros_like(t), t], -1).chunk(2, -1)[1]


def make_params(C, dtype=torch.float32, device="cpu", weight=True, bias=True, layout="contiguous"):
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).to(dtype) if weight else None
    b = torch.randn(C, dtype=torch.float64, device=device).to(dtype) if bias else None
    return tuple(None if t is None else laid_out(t, layout) for t in (w, b))


def make_modulation(N, C, dtype=torch.float32, device="cpu", scale=True, shift=True, layout="contiguous"):
    """Per-sample (N, C) scale and shift (None where not asked for), laid out as `layout` (laid_out)."""
    s = (0.5 * torch.randn(N, C, dtype=torch.float64, device=device)).to(dtype) if scale else None
    t = torch.randn(N, C, dtype=torch.float64, device=device).to(dtype) if shift else None
    return tuple(None if u is None else laid_out(u, layout) for u in (s, t))


class _Recorder:
    """A kernel's stand-in: records kernel[grid](*args, **kwargs), then launches the real one."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def recording(monkeypatch, launch=_launch):
    """Yields the list of every kernel launch (name, grid, keyword arguments) made inside the block
    through `launch`'s kernel table: gn_triton._launch's, or that of another copy of gn_triton (a
    kernels-hub build's)."""
    launches = []
    for name, kernel in launch.KERNELS.items():
        monkeypatch.setitem(launch.KERNELS, name, _Recorder(name, kernel, launches))
    yield launches


def forced(plan: str):
    """Force the named plan of cases.PLANS for the calls inside the block."""
    return _tuning.override_plan(**PLANS[plan])


def torch_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale=None, shift=None):
    """torch's own ops: F.group_norm, then y*(1 + scale) + shift per (n, c), then the activation."""
    return torch_epilogue(F.group_norm(x, num_groups, weight, bias, eps), activation, scale, shift)


ROOT = Path(__file__).resolve().parents[1]


def python_without_interpreter(*args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """`python *args` from the repository root with TRITON_INTERPRET unset (and `env` added): the
    kernels compile for real, or a command sets the interpreter itself before gn_triton loads."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def forward_backward(fn, x, num_groups, weight=None, bias=None, dy=None, eps=1e-5, dtype=None, **epilogue):
    """Run fn(x, num_groups, weight, bias, eps, activation=..., scale=..., shift=...) on fresh leaf
    copies (cast to `dtype` if given) and backpropagate dy (random if None). Returns (y, dx, dweight,
    dbias, dscale, dshift), None where there is no such input; the callers' tensors are never touched.
    Without `dtype`, each tensor keeps its strides (a strided, transposed or stride-0 view stays one:
    a view of a copied storage, whose own gradient is returned)."""

    def leaf(t):
        if t is None:
            return None
        if dtype is not None:
            return t.detach().to(dtype).requires_grad_()
        storage = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
        view = storage.clone().requires_grad_().as_strided(t.shape, t.stride(), t.storage_offset())
        view.retain_grad()
        return view

    x_, w_, b_ = leaf(x), leaf(weight), leaf(bias)
    scale, shift = leaf(epilogue.pop("scale", None)), leaf(epilogue.pop("shift", None))
    y = fn(x_, num_groups, w_, b_, eps, scale=scale, shift=shift, **epilogue)
    y.backward(torch.randn_like(y) if dy is None else dy.to(y.dtype))
    return (y.detach(), *(None if t is None else t.grad for t in (x_, w_, b_, scale, shift)))


def reference(x, num_groups, weight=None, bias=None, dy=None, eps=1e-5, **epilogue):
    """The float64 reference's (y, dx, dweight, dbias, dscale, dshift). The kernels apply eps exactly
    (fp64 kernels get it as an fp32 pair whose sum is eps to ~2^-48), so the reference takes it as is."""
    return forward_backward(group_norm_reference, x, num_groups, weight, bias, dy, eps, torch.float64, **epilogue)


def _torch_params(x, weight, bias):
    """weight and bias as torch's CPU kernel takes them: present (its backward fails on a bias
    without a weight) and of x's dtype, or fp32 for 16-bit x (it refuses other mixes)."""
    wide = torch.float32 if x.dtype in SIXTEEN_BIT else x.dtype

    def fix(t, fill):
        if t is None:
            return torch.full((x.shape[1],), fill, dtype=x.dtype, device=x.device)
        return t if t.dtype in (x.dtype, wide) else t.to(wide)

    return fix(weight, 1.0), fix(bias, 0.0)


def assert_close(out, expected, tolerance, what="output"):
    err = error(out, expected)
    assert err <= tolerance, f"{what}: error {err:.3g} > tolerance {tolerance:.3g}"


class _ShardsInOneProcess(torch.autograd.Function):
    """gn_triton.distributed's steps for every shard of x (cut along `dim` into `sizes`), run one after
    the other in this process where the ranks would exchange: the kernels and merges of a sharded call
    without a process group (its forward and backward assemble the shards' outputs and sum their
    parameter gradients, as all_reduce would)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation, dim, sizes):
        from gn_triton import _launch, distributed
        from gn_triton._plan import Affine

        ctx.affine = Affine(weight, bias, scale, shift, activation)
        ctx.shards, ctx.num_groups, ctx.dim, ctx.sizes = torch.split(x, sizes, dim), num_groups, dim, sizes
        gathered = torch.stack([distributed.shard_statistics(t, num_groups) for t in ctx.shards])
        ctx.stats = distributed.whole_statistics(gathered, eps, _launch.stats_dtype(x))
        ys = [distributed.shard_output(t, num_groups, ctx.affine, ctx.stats, x.dtype) for t in ctx.shards]
        y = torch.cat(ys, dim)
        return y.contiguous(memory_format=_launch.memory_format(x))  # cat's own choice may differ from x's

    @staticmethod
    def backward(ctx, dy):
        from gn_triton import distributed

        dys = torch.split(dy, ctx.sizes, ctx.dim)
        needs = ctx.needs_input_grad[1:5]
        per_shard = [distributed.shard_grad_sums(d, t, ctx.num_groups, ctx.affine, ctx.stats, needs)
                     for d, t in zip(dys, ctx.shards)]  # fmt: skip
        total = torch.stack([sums for sums, *_ in per_shard]).sum(0)
        dx = torch.cat([distributed.shard_dx(d, t, ctx.num_groups, ctx.affine, ctx.stats, total)
                        for d, t in zip(dys, ctx.shards)], ctx.dim)  # fmt: skip
        grads = [sum(g[k] for _, *g in per_shard) if need else None for k, need in enumerate(needs)]
        return (dx, *grads, None, None, None, None, None)


def sharded(dim: int, sizes: list[int]):
    """A group_norm-like function running gn_triton.distributed's steps on shards of sizes `sizes` along
    `dim`, in one process (for assert_matches_reference's `fn`)."""

    def fn(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale=None, shift=None):
        return _ShardsInOneProcess.apply(x, weight, bias, scale, shift, num_groups, eps, activation, dim, sizes)

    return fn


def assert_matches_reference(x, num_groups, weight=None, bias=None, dy=None, eps=1e-5, fn=None, **epilogue):
    """gn_triton's forward and every gradient (`epilogue`: activation, scale, shift; or those of `fn`,
    a function with group_norm's arguments) against the float64 reference; dtypes and output memory
    format against torch's. Tolerance of each output:
    TOLERANCE of its dtype, plus for 16-bit input 2x torch's own error at that dtype (its
    F.group_norm and the same epilogue in torch ops, on the same inputs). Returns gn_triton's
    (y, dx, dweight, dbias, dscale, dshift)."""
    if dy is None:
        dy = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    ours = forward_backward(fn or gn_triton.group_norm, x, num_groups, weight, bias, dy, eps, **epilogue)
    ref = reference(x, num_groups, weight, bias, dy, eps, **epilogue)
    torch_weight, torch_bias = _torch_params(x, weight, bias)
    theirs = None
    if x.dtype in SIXTEEN_BIT:
        theirs = forward_backward(torch_group_norm, x, num_groups, torch_weight, torch_bias, dy, eps, **epilogue)
    inputs = (x, x, weight, bias, epilogue.get("scale"), epilogue.get("shift"))  # each output's dtype
    for k, (name, out, r, like) in enumerate(zip(OUTPUTS, ours, ref, inputs)):
        if r is None:
            assert out is None, name
            continue
        assert out.dtype == like.dtype and out.shape == like.shape, (name, out.dtype, out.shape)
        tolerance = TOLERANCE[out.dtype] + (0.0 if theirs is None else 2 * error(theirs[k], r))
        assert_close(out, r, tolerance, f"{name} (shape {tuple(x.shape)}, {x.dtype})")
    with torch.no_grad():
        torch_y = torch_group_norm(x, num_groups, torch_weight, torch_bias, eps, **epilogue)
    fmt = torch._prims_common.suggest_memory_format(torch_y)
    assert ours[0].is_contiguous(memory_format=fmt), f"output strides {ours[0].stride()}, torch's {torch_y.stride()}"
    return ours
