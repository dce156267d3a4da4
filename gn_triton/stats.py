"""GroupNorm's statistics as values of their own: take them of a piece of a tensor, merge the pieces',
normalise with the merged ones. What gn_triton.distributed is built on; on one GPU, a tiled pass over
an input too large to hold at once (the pieces are slabs of one sample along any non-channel
dimension, e.g. tiles of H of a video decoder's activation):

    from gn_triton import stats
    parts = [stats.group_stats(tile, 32) for tile in tiles]              # (N, G) values per tile
    merged = stats.merge_stats(parts)                                    # the whole tensor's
    outputs = [stats.normalize(tile, merged, weight, bias) for tile in tiles]

equals gn_triton.group_norm(torch.cat(tiles, dim), 32, weight, bias), tile by tile. Each call reads its
tile once; the statistics are (N, G) values in fp32 (fp64 for fp64 input) whose mean is carried as a
pair (mean + mean_lo) and whose spread is the sum of squared deviations m2 (never E[x^2] - E[x]^2), so
merging pieces loses nothing to a large common offset; merges run in float64, in list order.

These functions do not track gradients (raising if asked to): training a sharded model is
gn_triton.distributed.group_norm, whose backward this module's pieces do not cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _checks, _parts
from ._launch import stats_dtype
from ._plan import Affine


class GroupStats(NamedTuple):
    """Statistics of each (sample, group) of a tensor or a piece of one, each (N, G):
    count: elements (int64); mean: their mean, rounded to the statistics dtype (fp32, fp64 for fp64
    input); mean_lo: the rounding residual (mean + mean_lo is the mean to about twice that precision);
    m2: the sum of squared deviations from the mean (variance = m2 / count)."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as intended
    mean: torch.Tensor
    mean_lo: torch.Tensor
    m2: torch.Tensor


def _no_grad(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"gn_triton.stats.{name}() does not track gradients; call it under torch.no_grad(), or use "
            "gn_triton.group_norm (one tensor) or gn_triton.distributed.group_norm (shards) for training"
        )


def group_stats(input: torch.Tensor, num_groups: int) -> GroupStats:
    """The statistics of each of input's (N, C, *) groups of C/num_groups channels, over input's own
    positions (any number, also none: count 0). Reads input once, on gn_triton's kernels where
    gn_triton.group_norm would run them (gn_triton.backend_for), else in torch ops."""
    _checks.check_group_norm_args(input, num_groups, None, None, whole=False)
    _no_grad("group_stats", input)
    if _checks.backend_for(input) == "torch":
        return GroupStats(*_parts.torch_group_stats(input, num_groups))
    return GroupStats(*_parts.group_stats(input, num_groups))


def merge_stats(parts: Sequence[GroupStats]) -> GroupStats:
    """The statistics of the union of the pieces (Chan's parallel update in float64, in list order):
    each piece's are group_stats of the same samples and groups over other positions."""
    parts = list(parts)
    if not parts or not all(isinstance(s, GroupStats) for s in parts):
        raise TypeError(f"merge_stats(): expected a non-empty sequence of GroupStats, got {parts!r:.200}")
    first = parts[0]
    for k, s in enumerate(parts):
        if s.mean.shape != first.mean.shape or s.mean.dtype != first.mean.dtype or s.mean.device != first.mean.device:
            raise RuntimeError(
                f"merge_stats(): every piece must have statistics of one shape, dtype and device; piece 0 has "
                f"{tuple(first.mean.shape)} {first.mean.dtype} on {first.mean.device}, piece {k} has "
                f"{tuple(s.mean.shape)} {s.mean.dtype} on {s.mean.device}"
            )
    stacked = [torch.stack([getattr(s, field) for s in parts]) for field in GroupStats._fields]
    count, mean, mean_lo, m2 = stacked
    return merged(count, mean, mean_lo, m2, first.mean.dtype)


def merged(count, mean, mean_lo, m2, dtype: torch.dtype) -> GroupStats:
    """The merge of stacked pieces (parts along dim 0), its values in `dtype`."""
    total, ref, delta, m2 = _parts.merge(count, mean, mean_lo, m2, 0)
    hi, lo = _parts.as_pair(ref, delta, dtype)
    return GroupStats(total.round().to(torch.int64), hi, lo, m2.to(dtype))


def normalize(
    input: torch.Tensor,
    stats: GroupStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    keep_input_dtype: bool = False,
) -> torch.Tensor:
    """GroupNorm of input with the given statistics (e.g. merge_stats of all its pieces): what
    gn_triton.group_norm gives with those statistics, the same epilogue keywords (weight, bias, scale,
    shift, activation) and output dtype and memory format; the group count is stats'. One read of input."""
    if not isinstance(stats, GroupStats):
        raise TypeError(f"normalize(): stats must be GroupStats (from group_stats), got {type(stats).__name__}")
    num_groups = stats.mean.shape[-1] if stats.mean.dim() == 2 else -1
    _checks.check_group_norm_args(input, max(num_groups, 1), weight, bias, eps, whole=False)
    _checks.check_activation(activation)
    _checks.check_modulation(input, scale, shift)
    rows = (input.shape[0], num_groups)
    for name, t in zip(GroupStats._fields, stats):
        if tuple(t.shape) != rows or t.device != input.device:
            raise RuntimeError(
                f"normalize(): expected stats.{name} of shape (N, G) = ({input.shape[0]}, G) with G dividing "
                f"{input.shape[1]} channels, on {input.device}; got shape {tuple(t.shape)} on {t.device}"
            )
    _no_grad("normalize", input, weight, bias, scale, shift)
    dtype = stats_dtype(input)
    mean, mean_lo = stats.mean.to(dtype), stats.mean_lo.to(dtype)
    rstd = _parts.rstd_of(stats.count, stats.m2, float(eps), dtype)
    out_dtype = input.dtype if keep_input_dtype else _checks.output_dtype(input)
    affine = Affine(weight, bias, scale, shift, activation)
    run = _parts.torch_normalize if _checks.backend_for(input) == "torch" else _parts.normalize
    return run(input, num_groups, affine, mean, mean_lo, rstd, out_dtype)


__all__ = ["GroupStats", "group_stats", "merge_stats", "normalize"]
