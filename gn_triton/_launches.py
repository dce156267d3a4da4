"""Which kernels a plan launches, on which grid, with which constexprs: one table of a call's launches
that the launcher (gn_triton._launch runs exactly these), the cost model (how many), `explain` (which)
and the tests read.

    plan_launches("bwd", problem, plan, needs) -> [Launch("_gn_bwd_partial_sums_kernel", (12, 32), {...}), ...]

Forward: fused, one launch of a block per program; split, per wave a partial-statistics launch and
an apply launch over (blocks of the wave, spans, channel chunks). Backward: fused, one launch; split,
per wave a partial-sums launch and (when dx is needed) a dx launch on the same grid; then a small
reduction for dweight/dbias and one for dscale/dshift, each only when one of its gradients is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import triton

from ._plan import Plan, Problem, merge_step

# Which gradients a backward computes: dx, dweight, dbias, dscale, dshift.
GRADIENTS = ("dx", "dweight", "dbias", "dscale", "dshift")


@dataclass(frozen=True)
class Launch:
    kernel: str  # its name in gn_triton.kernels
    grid: tuple[int, ...]
    constexprs: dict = field(default_factory=dict)  # every keyword argument: constexprs and num_warps
    offset: int = 0  # the first block of the launch's wave (the split kernels' block_offset argument)


def default_needs(p: Problem) -> tuple[bool, ...]:
    """Every gradient the problem has an input for (what a training step asks for)."""
    return (True, p.has_weight, p.has_bias, p.has_scale, p.has_shift)


def plan_launches(direction: str, p: Problem, plan: Plan, needs: Sequence[bool] | None = None) -> list[Launch]:
    """The launches of one call of `direction` ("fwd" or "bwd") with `plan` (fitted to p), in order."""
    plan = plan.fit(p)
    needs_dx, needs_dw, needs_db, needs_dscale, needs_dshift = default_needs(p) if needs is None else needs
    # The normalising kernels': the plan's tile and the problem's flags.
    flags = dict(plan.meta(), **p.flags(plan.groups_per_program))
    if direction == "fwd":
        if plan.split == 1:
            return [Launch("_gn_fwd_fused_kernel", (plan.blocks(p),), flags)]
        spans, chunks = plan.span(p.S)[1], plan.chunk(p)[1]
        stats = dict(plan.meta(), **p.base_flags(plan.groups_per_program), CHUNK_C=plan.chunk_constexpr(p))
        apply = dict(flags, BLOCK_SPANS=merge_step(spans * chunks), CHUNK_C=plan.chunk_constexpr(p))
        return [launch for offset, count in plan.waves(p)
                for launch in (Launch("_gn_fwd_partial_stats_kernel", (count, spans, chunks), stats, offset),
                               Launch("_gn_fwd_split_apply_kernel", (count, spans, chunks), apply,
                                      offset))]  # fmt: skip
    needs_partials = needs_dw or needs_db or needs_dscale or needs_dshift
    if plan.split == 1:
        spans = 1
        out = [Launch("_gn_bwd_fused_kernel", (plan.blocks(p),),
                      dict(flags, NEEDS_DX=needs_dx, NEEDS_PARTIALS=needs_partials))]  # fmt: skip
    else:
        spans, chunks = plan.span(p.S)[1], plan.chunk(p)[1]
        sums = dict(flags, CHUNK_C=plan.chunk_constexpr(p))
        dx = dict(sums, BLOCK_SPANS=merge_step(spans))
        out = []
        for offset, count in plan.waves(p):
            out.append(Launch("_gn_bwd_partial_sums_kernel", (count, spans, chunks), sums, offset))
            if needs_dx:
                out.append(Launch("_gn_bwd_split_dx_kernel", (count, spans, chunks), dx, offset))
    return out + _parameter_grad_launches(p, (needs_dw, needs_db, needs_dscale, needs_dshift), flags["ACC"])


def _parameter_grad_launches(p: Problem, needs: Sequence[bool], acc) -> list[Launch]:
    """The reductions of the per-(n, c, span) gradient sums into dweight/dbias and dscale/dshift, each
    only when one of its gradients is needed (needs: dweight, dbias, dscale, dshift)."""
    needs_dw, needs_db, needs_dscale, needs_dshift = needs
    out = []
    block_c = min(triton.next_power_of_2(p.C), 128)
    channel_blocks = triton.cdiv(p.C, block_c)
    if needs_dw or needs_db:
        out.append(Launch("_gn_bwd_dparams_kernel", (channel_blocks,),
                          dict(BLOCK_N=min(triton.next_power_of_2(p.N), 16), BLOCK_C=block_c, HAS_SCALE=p.has_scale,
                               NEEDS_DW=needs_dw, NEEDS_DB=needs_db, ACC=acc)))  # fmt: skip
    if needs_dscale or needs_dshift:
        out.append(Launch("_gn_bwd_dscale_shift_kernel", (p.N, channel_blocks),
                          dict(BLOCK_C=block_c, HAS_WEIGHT=p.has_weight, HAS_BIAS=p.has_bias,
                               NEEDS_DSCALE=needs_dscale, NEEDS_DSHIFT=needs_dshift, ACC=acc)))  # fmt: skip
    return out


# The passes of a call run in parts (gn_triton.stats, gn_triton.distributed), by name: their kernel.
PARTS = {
    "stats": "_gn_fwd_partial_stats_kernel",  # per-span statistics of x - pilot
    "normalize": "_gn_normalize_kernel",  # y with given statistics
    "grad_sums": "_gn_bwd_partial_sums_kernel",  # per-(n, c, span) gradient sums (then the parameters')
    "dx": "_gn_dx_kernel",  # dx with given group coefficients
}


def plan_part_launches(part: str, p: Problem, plan: Plan, needs: Sequence[bool] = (False,) * 4) -> list[Launch]:
    """The launches of one part (a key of PARTS) with `plan` (fitted to p): per wave, its kernel over
    (blocks of the wave, spans[, channel chunks]); "grad_sums" then reduces the sums into the parameters' gradients that
    `needs` asks for (dweight, dbias, dscale, dshift)."""
    plan = plan.fit(p)
    groups = plan.groups_per_program
    flags = dict(plan.meta(), **(p.base_flags(groups) if part == "stats" else p.flags(groups)))
    grid: tuple[int, ...] = (plan.span(p.S)[1],)
    if part in ("stats", "grad_sums"):  # these walk a group's channels in the plan's chunks
        flags["CHUNK_C"] = plan.chunk_constexpr(p)
        grid += (plan.chunk(p)[1],)
    out = [Launch(PARTS[part], (count, *grid), flags, offset) for offset, count in plan.waves(p)]
    if part == "grad_sums":
        out += _parameter_grad_launches(p, needs, flags["ACC"])
    return out
