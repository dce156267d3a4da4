"""The kernels as torch.library custom ops, so torch.compile and torch.export trace them without
graph breaks.

Each op has a fake (meta) implementation that allocates on the input's device with the real op's
shapes, dtypes and memory format.

Both ops are tagged flexible_layout: they read any strides (channels_last natively), so Inductor
passes its own layout (e.g. the channels_last output of a convolution it chose) instead of copying
the activation into the strides of the eager trace first.

Both ops have batching rules (torch.library.register_vmap), so torch.func.vmap runs them, also inside
grad and jacrev: GroupNorm is per sample, so a vmapped dimension folds into the batch N. A vmapped
weight or bias becomes the per-sample modulation the kernels already fuse (see _as_modulation).
"""

from __future__ import annotations

import torch

from . import _launch
from ._plan import Affine

# The ops' torch.library namespace: the package's own module name, "gn_triton" when installed. A copy
# loaded under another name (a kernels-hub build, whose module name is its unique build id) registers
# its own ops beside an installed gn_triton's instead of colliding with them; one name is one module,
# so a copy is never registered twice.
NAMESPACE: str = __name__.rpartition(".")[0].replace(".", "_")
_FLEXIBLE = (torch.Tag.flexible_layout,)


@torch.library.custom_op(f"{NAMESPACE}::group_norm_fwd", mutates_args=(), tags=_FLEXIBLE)
def group_norm_fwd(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, mean_lo, rstd): y = activation((GroupNorm(input)*(1 + scale) + shift) in out_dtype
    (default input's) and input's memory format; (N, G) statistics in fp32 (fp64 for fp64 input), the
    mean as the pair mean + mean_lo."""
    return _launch.gn_fwd(input, num_groups, eps, Affine(weight, bias, scale, shift, activation), out_dtype)


@group_norm_fwd.register_fake
def _(input, weight, bias, num_groups, eps, activation=None, scale=None, shift=None, out_dtype=None):
    return _launch.empty_outputs(input, num_groups, out_dtype)


@torch.library.custom_op(f"{NAMESPACE}::group_norm_bwd", mutates_args=(), tags=_FLEXIBLE)
def group_norm_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    mean_lo: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    output_mask: list[bool],
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dscale, dshift); a gradient not in `output_mask` (or of a None tensor) is
    empty. With a fused activation its pre-activation is recomputed from input and the statistics."""
    affine = Affine(weight, bias, scale, shift, activation)
    dx, dweight, dbias, dscale, dshift = _launch.gn_bwd(
        grad_out, input, num_groups, affine, mean, mean_lo, rstd, output_mask
    )
    return dx, dweight, dbias, dscale, dshift


@group_norm_bwd.register_fake
def _(grad_out, input, weight, bias, mean, mean_lo, rstd, num_groups, output_mask, activation=None, scale=None,
      shift=None):  # fmt: skip
    return _launch.empty_grads(input, Affine(weight, bias, scale, shift), output_mask)


# --- batching rules ------------------------------------------------------------------------------


def _leading(t: torch.Tensor | None, dim: int | None, batch: int) -> torch.Tensor | None:
    """t with its vmapped dimension first (an unbatched t expanded to the batch)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)


def _folded(t: torch.Tensor | None, dim: int | None, batch: int) -> torch.Tensor | None:
    """A per-sample tensor (N, ...) of every vmapped instance as one (batch*N, ...) tensor."""
    t = _leading(t, dim, batch)
    return None if t is None else t.reshape(-1, *t.shape[2:])


def _as_modulation(batch, N, weight, w_dim, bias, b_dim, scale, shift, acc):
    """weight and bias of each vmapped instance, folded into per-sample (batch*N, C) modulation in the
    accumulator dtype `acc`: z = (x_hat*w + b)*g + t with g = 1 + scale equals x_hat*(1 + s2) + t2 with
    s2 = w*g - 1 and t2 = b*g + t (in fp32, a weight far below 1 keeps ~1e-7 absolute precision).
    Returns (s2, t2, g) with g as (batch, N, C) or None."""
    present, dim = (weight, w_dim) if weight is not None else (bias, b_dim)
    C = _leading(present, dim, batch).shape[-1]  # the vmapped dimension may be the last (in_dims=1)
    g = None if scale is None else 1 + scale.to(acc).reshape(batch, N, C)
    if weight is None:
        w = torch.ones((batch, 1, C), dtype=acc, device=present.device)
    else:
        w = _leading(weight, w_dim, batch).to(acc).reshape(batch, 1, C)
    b = _leading(bias, b_dim, batch)
    s2 = (w if g is None else w * g) - 1
    t2 = None if b is None else b.to(acc).reshape(batch, 1, C) * (1 if g is None else g)
    if shift is not None:
        t = shift.to(acc).reshape(batch, N, C)
        t2 = t if t2 is None else t2 + t
    s2 = s2.expand(batch, N, C).reshape(batch * N, C)
    t2 = None if t2 is None else t2.expand(batch, N, C).reshape(batch * N, C)
    return s2, t2, g


def _unfolded(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1, *t.shape[1:])


@torch.library.register_vmap(f"{NAMESPACE}::group_norm_fwd")
def _fwd_vmap(info, in_dims, input, weight, bias, num_groups, eps, activation=None, scale=None, shift=None,
              out_dtype=None):  # fmt: skip
    x_dim, w_dim, b_dim, _, _, _, s_dim, t_dim = (*in_dims, *[None] * 8)[:8]
    batch = info.batch_size
    x = _leading(input, x_dim, batch)
    N = x.shape[1]
    x = x.reshape(batch * N, *x.shape[2:])
    scale, shift = _folded(scale, s_dim, batch), _folded(shift, t_dim, batch)
    if w_dim is not None or b_dim is not None:  # weights that differ per instance
        scale, shift, _ = _as_modulation(batch, N, weight, w_dim, bias, b_dim, scale, shift, _launch.stats_dtype(x))
        weight = bias = None
    outputs = group_norm_fwd(x, weight, bias, num_groups, eps, activation, scale, shift, out_dtype)
    return tuple(_unfolded(t, batch) for t in outputs), (0, 0, 0, 0)


@torch.library.register_vmap(f"{NAMESPACE}::group_norm_bwd")
def _bwd_vmap(info, in_dims, grad_out, input, weight, bias, mean, mean_lo, rstd, num_groups, output_mask,
              activation=None, scale=None, shift=None):  # fmt: skip
    dy_dim, x_dim, w_dim, b_dim, m_dim, lo_dim, r_dim, _, _, _, s_dim, t_dim = (*in_dims, *[None] * 12)[:12]
    batch = info.batch_size
    dy, x = _folded(grad_out, dy_dim, batch), _folded(input, x_dim, batch)
    mean, mean_lo, rstd = (_folded(t, d, batch) for t, d in ((mean, m_dim), (mean_lo, lo_dim), (rstd, r_dim)))
    scale, shift = _folded(scale, s_dim, batch), _folded(shift, t_dim, batch)
    needs_dx, needs_dw, needs_db, needs_ds, needs_dt = output_mask
    needs_dw, needs_db = needs_dw and weight is not None, needs_db and bias is not None
    empty = x.new_empty(0)
    if not (needs_dw or needs_db or w_dim is not None or b_dim is not None):
        dx, _, _, ds, dt = group_norm_bwd(
            dy, x, weight, bias, mean, mean_lo, rstd, num_groups, output_mask, activation, scale, shift
        )
        grads = (_unfolded(dx, batch) if needs_dx else empty, empty, empty, *(
            _unfolded(g, batch) if g.numel() else empty for g in (ds, dt)))  # fmt: skip
        return grads, tuple(None if g is empty else 0 for g in grads)
    # dweight and dbias of each instance are sums over its own samples only: take them through the
    # per-sample modulation's gradients, d(s2) = sum(dz*x_hat) and d(t2) = sum(dz) per (sample, channel).
    N = x.shape[0] // batch
    s2, t2, g = _as_modulation(batch, N, weight, w_dim, bias, b_dim, scale, shift, rstd.dtype)
    if t2 is None:
        t2 = torch.zeros_like(s2)  # a zero shift: its gradient is dbias's
    mask = [needs_dx, False, False, True, True]
    dx, _, _, d_s2, d_t2 = group_norm_bwd(dy, x, None, None, mean, mean_lo, rstd, num_groups, mask, activation, s2, t2)
    d_s2, d_t2 = d_s2.reshape(batch, N, -1), d_t2.reshape(batch, N, -1)
    w = None if weight is None else _leading(weight, w_dim, batch).to(rstd.dtype).reshape(batch, 1, -1)
    b = None if bias is None else _leading(bias, b_dim, batch).to(rstd.dtype).reshape(batch, 1, -1)
    dw = (d_s2 if g is None else d_s2 * g).sum(1).to(weight.dtype) if needs_dw else empty
    db = (d_t2 if g is None else d_t2 * g).sum(1).to(bias.dtype) if needs_db else empty
    ds = empty
    if needs_ds and scale is not None:
        ds = d_s2 if w is None else d_s2 * w
        ds = (ds if b is None else ds + d_t2 * b).to(scale.dtype)
    dt = d_t2.to(shift.dtype) if needs_dt and shift is not None else empty
    grads = (_unfolded(dx, batch) if needs_dx else empty, dw, db, ds, dt)
    return grads, tuple(None if t is empty else 0 for t in grads)
