"""GroupNorm over a tensor sharded across processes along its positions: one sample too large for one
GPU, split along H (or T, D, ...) as patch-parallel VAE decoders and full-resolution 3-D segmentation
networks do.

    import gn_triton.distributed as gnd
    y = gnd.group_norm(x_shard, 32, weight, bias, group=pg)   # this rank's shard of group_norm(x, 32, ...)
    model = gnd.convert_model(model, group=pg)                # every nn.GroupNorm, in place

Each rank passes its shard of the full (N, C, *) tensor: the same N and C everywhere, the shards
differing along at most one non-channel dimension (any sizes, also empty). A call costs, per rank:
  forward:  one read of the shard for its statistics (gn_triton.stats.group_stats), a small exchange
            of shapes (16 int64, so that mismatched shards raise on every rank instead of hanging), one
            all_gather of the (N, G) statistics (count, mean, mean_lo, m2: 4*N*G float64 per rank),
            the same fixed-order merge on every rank (float64, rank order), then one read and one write
            of the shard to normalise it (gn_triton.stats.normalize);
  backward: one read of the shard and its gradient for the per-(n, c) sums, one all_gather of them
            (2*N*C float64 per rank), the same fixed-order total on every rank, then dx (one more read
            of both, one write).
Every rank must run both, as with any collective layer (SyncBatchNorm).

Double backward (create_graph=True: gradient penalties, MAML): when the backward runs with a graph
being built, it rebuilds this rank's output from the saved tensors in differentiable torch ops, the
statistics gathered with differentiable collectives (torch.distributed.nn.functional.all_reduce), and
returns their vector-Jacobian product: exact to any order, slower than the kernels, and every rank must
take part (as in every backward). Without create_graph the backward runs the kernels above.

The result equals gn_triton.group_norm on the full tensor. The gradients of weight, bias, scale and
shift are this rank's contribution (over its own positions): summed over the ranks they are the full
gradient, as for every other layer of a spatially sharded model (sum them as the model's other
parameters' gradients are, e.g. all_reduce). The gradient of the input is exact on every rank.

Runs with NCCL on GPUs and gloo on CPUs (Triton's interpreter, or torch ops without it: backend_for),
under autograd. torch.compile: the call runs eagerly (Dynamo does not trace it; the rest of the model
compiles around it). CUDA graphs: the exchange of shapes reads values on the host, so it is skipped
during capture (shapes are checked by the eager warm-up calls capture needs anyway); NCCL collectives
capture as NCCL allows.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import _activations, _checks, _parts
from ._launch import stats_dtype
from ._plan import Affine
from .modules import GroupNorm as _GroupNorm
from .stats import group_stats, merged

_MAX_DIMS = 10  # dimensions of the shapes exchanged (input (N, C, *) of up to 10 dimensions)
_EXCHANGE = 6 + _MAX_DIMS  # failed, eps bits, dtype, flags, num_groups, ndim, shape


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's t, stacked in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPTIONAL = ("weight", "bias", "scale", "shift")


def _eps_bits(eps: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(eps)))[0]


def _options(code: int) -> str:
    """The optional tensors and the activation of a call, from its exchanged code."""
    names = [name for i, name in enumerate(_OPTIONAL) if code >> i & 1]
    activation = {number: name for name, number in _checks.ACTIVATIONS.items()}[code >> 4]
    return "+".join(names + [f"activation={activation}"])


# The exchanged fields after the error flag: (what, how to show a value).
_SHOWN: tuple[tuple[str, Callable[[int], object]], ...] = (
    ("eps", lambda bits: struct.unpack("<d", struct.pack("<q", bits))[0]),
    ("dtype", lambda code: str(_DTYPES[code]) if code < len(_DTYPES) else "other"),
    ("optional tensors and activation", _options),
    ("num_groups", int),
    ("number of dimensions", int),
)


def _exchange_shapes(input, num_groups, weight, bias, eps, activation, scale, shift, group, error) -> None:
    """Check that the ranks' calls fit together, on every rank: differing arguments, and an error raised
    by any rank's own checks (`error`), raise on all of them."""
    if error is None and input.dim() > _MAX_DIMS:
        error = RuntimeError(f"gn_triton.distributed.group_norm(): input of at most {_MAX_DIMS} dimensions, "
                             f"got {tuple(input.shape)}")  # fmt: skip
    if error is None:
        options = sum(1 << i for i, t in enumerate((weight, bias, scale, shift)) if t is not None)
        dtype = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else len(_DTYPES)
        row = [0, _eps_bits(eps), dtype, options | _checks.ACTIVATIONS[activation] << 4, num_groups, input.dim(),
               *input.shape]  # fmt: skip
    else:
        row = [1]
    row += [-1] * (_EXCHANGE - len(row))
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    rows = _all_gather(torch.tensor(row, dtype=torch.int64, device=device), group).tolist()
    failed = [rank for rank, r in enumerate(rows) if r[0]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"gn_triton.distributed.group_norm(): rank(s) {failed} rejected their arguments (see their "
                           "errors); every rank raises so that none waits")  # fmt: skip
    for k, (what, shown) in enumerate(_SHOWN, 1):
        if len({r[k] for r in rows}) > 1:
            raise RuntimeError(f"gn_triton.distributed.group_norm(): the ranks' calls differ in {what}: "
                               f"{[shown(r[k]) for r in rows]} (by rank); every rank must pass the same")  # fmt: skip
    shapes = [tuple(r[6 : 6 + r[5]]) for r in rows]
    shape = tuple(input.shape)
    if len({s[:2] for s in shapes}) > 1:
        raise RuntimeError(f"gn_triton.distributed.group_norm(): every shard must have the same N and C; "
                           f"shapes by rank: {shapes}")  # fmt: skip
    differing = [d for d in range(2, len(shape)) if len({s[d] for s in shapes}) > 1]
    if len(differing) > 1:
        raise RuntimeError(f"gn_triton.distributed.group_norm(): shards differ in dimensions {differing}, but "
                           f"shards along the positions differ in one at most; shapes by rank: {shapes}")  # fmt: skip
    if shape[0] * (shape[1] // num_groups) * sum(torch.Size(s[2:]).numel() for s in shapes) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shapes} (by rank)")


# The steps of a call on one shard, between the collectives (the autograd.Function below runs them with
# all_gather in between; a test or a GPU check can run them for several shards in one process). Each runs
# gn_triton's kernels where gn_triton.group_norm would (backend_for), else the same part in torch ops.
# `stats` is the whole tensor's (mean, mean_lo, rstd, count), each (N, G).


def _on_kernels(x: torch.Tensor) -> bool:
    return _checks.backend_for(x) != "torch"


def shard_statistics(input: torch.Tensor, num_groups: int) -> torch.Tensor:
    """This shard's (count, mean, mean_lo, m2) per (n, g), stacked in float64: (4, N, G), what is gathered."""
    with torch.no_grad():
        return torch.stack([t.to(torch.float64) for t in group_stats(input, num_groups)])


def whole_statistics(gathered: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The whole tensor's stats from every shard's (ranks along dim 0), merged in rank order."""
    count, mean, mean_lo, m2 = gathered.unbind(1)
    count, mean, mean_lo, m2 = merged(count, mean, mean_lo, m2, dtype)
    return mean, mean_lo, _parts.rstd_of(count, m2, eps, dtype), count


def shard_output(input, num_groups: int, affine: Affine, stats, out_dtype: torch.dtype) -> torch.Tensor:
    normalize = _parts.normalize if _on_kernels(input) else _parts.torch_normalize
    mean, mean_lo, rstd = stats[:3]
    return normalize(input, num_groups, affine, mean, mean_lo, rstd, out_dtype)


def shard_grad_sums(dy, input, num_groups: int, affine: Affine, stats, needs) -> tuple[torch.Tensor, ...]:
    """(per-(n, c) sums of dz and dz*(x - mean) over this shard, float64 (N, C, 2): what is gathered;
    then this shard's contribution to dweight, dbias, dscale, dshift, those `needs` asks for)."""
    grad_sums = _parts.grad_sums if _on_kernels(input) else _parts.torch_grad_sums
    mean, mean_lo, rstd = stats[:3]
    return grad_sums(dy, input, num_groups, affine, mean, mean_lo, rstd, needs)


def shard_dx(dy, input, num_groups: int, affine: Affine, stats, total: torch.Tensor) -> torch.Tensor:
    """dx of this shard from the sums over all shards (`total`, summed in rank order)."""
    mean, mean_lo, rstd, count = stats
    coef_x, coef_1 = _parts.dx_coefficients(total, count, affine, num_groups, mean_lo, rstd)
    run = _parts.dx if _on_kernels(input) else _parts.torch_dx
    return run(dy, input, num_groups, affine, mean, mean_lo, rstd, coef_x, coef_1)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks, differentiable (its backward sums the ranks' gradients)."""
    from torch.distributed.nn.functional import all_reduce  # imported here: it pulls in torch.distributed.nn

    return all_reduce(t, group=group)


def _differentiable_shard_output(input, weight, bias, scale, shift, num_groups, eps, activation, group, out_dtype):
    """What shard_output computes, in differentiable torch ops with differentiable collectives (the
    statistics as functions of every shard): the backward builds its graph from it when asked to
    (create_graph=True), so that gradients of gradients are right across the ranks."""
    N, C = input.shape[:2]
    acc = stats_dtype(input)
    rows = input.to(acc).reshape(N, num_groups, -1)
    count = _all_reduce(torch.full((N, num_groups), rows.shape[-1], dtype=acc, device=input.device), group)
    mean = _all_reduce(rows.sum(-1), group) / count
    xc = rows - mean[..., None]
    rstd = torch.rsqrt(_all_reduce((xc * xc).sum(-1), group) / count + eps)
    z = (xc * rstd[..., None]).reshape(N, C, -1)
    if weight is not None:
        z = z * weight.to(acc)[:, None]
    if bias is not None:
        z = z + bias.to(acc)[:, None]
    if scale is not None:
        z = z * (1 + scale.to(acc)[..., None])
    if shift is not None:
        z = z + shift.to(acc)[..., None]
    y = z if activation is None else _activations.ACTIVATIONS[activation].torch(z)
    return y.reshape(input.shape).to(out_dtype)


class _ShardedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, scale, shift, num_groups, eps, activation, group, out_dtype):
        gathered = _all_gather(shard_statistics(input, num_groups), group)
        stats = whole_statistics(gathered, eps, stats_dtype(input))
        y = shard_output(input, num_groups, Affine(weight, bias, scale, shift, activation), stats, out_dtype)
        ctx.save_for_backward(input, weight, bias, scale, shift, *stats)
        ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
        ctx.group, ctx.out_dtype = group, out_dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, bias, scale, shift, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return _ShardedGroupNorm._differentiable_backward(ctx, dy, input, weight, bias, scale, shift)
        affine = Affine(weight, bias, scale, shift, ctx.activation)
        sums, *grads = shard_grad_sums(dy, input, ctx.num_groups, affine, stats, needs[1:5])
        total = _all_gather(sums, ctx.group).sum(0)  # the same fixed-order total on every rank
        dx = shard_dx(dy, input, ctx.num_groups, affine, stats, total) if needs[0] else None
        grads = tuple(g if need and g.numel() else None for g, need in zip(grads, needs[1:5]))
        return (dx, *grads, None, None, None, None, None)

    @staticmethod
    def _differentiable_backward(ctx, dy, *tensors):
        """The gradients as the vector-Jacobian product of the forward rebuilt in torch ops from the
        saved tensors (which carry their graph under create_graph): slower than the kernels, exact to
        any order. Every rank runs it, as every rank runs the backward."""
        wanted = [t for t, need in zip(tensors, ctx.needs_input_grad[:5]) if need and t is not None]
        y = _differentiable_shard_output(*tensors, ctx.num_groups, ctx.eps, ctx.activation, ctx.group, ctx.out_dtype)
        found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True) if wanted else ())
        grads = [next(found) if need and t is not None else None for t, need in zip(tensors, ctx.needs_input_grad[:5])]
        return (*grads, None, None, None, None, None)


@torch.compiler.disable
def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group: dist.ProcessGroup | None = None,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    keep_input_dtype: bool = False,
) -> torch.Tensor:
    """This rank's shard of gn_triton.group_norm(full, num_groups, weight, bias, eps, activation=...,
    scale=..., shift=...), where `full` is the tensor whose shards the ranks of `group` (default: the
    world) pass as `input` (same N and C; shards of any sizes along one non-channel dimension, empty
    ones too). weight and bias (C,) and scale and shift (N, C) are the same on every rank; their
    gradients are this rank's contribution, summing to the full gradient over the ranks (module
    docstring). Every rank of `group` must call it, with the same arguments but input. Bad or
    mismatched arguments raise on every rank."""
    error = None
    try:
        _checks.check_group_norm_args(input, num_groups, weight, bias, eps, whole=False)
        _checks.check_activation(activation)
        _checks.check_modulation(input, scale, shift)
    except Exception as e:  # raised after the exchange, so that the other ranks raise too
        error = e
    if error is not None or not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        _exchange_shapes(input, num_groups, weight, bias, eps, activation, scale, shift, group, error)
    out_dtype = input.dtype if keep_input_dtype else _checks.output_dtype(input)
    args = (input, weight, bias, scale, shift, num_groups, float(eps), activation, group, out_dtype)
    return _ShardedGroupNorm.apply(*args)


class GroupNorm(_GroupNorm):
    """gn_triton.GroupNorm (an nn.GroupNorm with the same state_dict) over a tensor sharded across the
    ranks of `group` (default: the world) along its positions: forward is group_norm above."""

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, input: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, group=self.group,
                          activation=self.activation, scale=scale, shift=shift,
                          keep_input_dtype=self.keep_input_dtype)  # fmt: skip


def convert_model(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """Make every torch.nn.GroupNorm and gn_triton.GroupNorm in `model` a sharded GroupNorm over
    `group`, in place (as gn_triton.convert_model: identity, parameters and hooks kept, a fused
    activation too), and return `model`."""
    for module in model.modules():
        if type(module) in (torch.nn.GroupNorm, _GroupNorm):
            # (torch types a Module's attributes it does not declare as Tensor | Module)
            module.activation = getattr(module, "activation", None)  # type: ignore[assignment]
            module.__class__ = GroupNorm
            module.group = group  # type: ignore[assignment]
    return model


__all__ = ["GroupNorm", "convert_model", "group_norm"]
