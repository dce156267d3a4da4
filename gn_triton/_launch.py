"""Allocation and launches, as cached launch programs: `gn_fwd` and `gn_bwd` (the ops' entry points),
`forward_program` (the eager route's, gn_triton.autograd).

A call is a Problem and an Affine, cut into programs by a Plan (gn_triton._plan) that gn_triton._tuning
chooses (the cost model's, or autotuned); the launch table (gn_triton._launches) lists the kernels of
that plan, and this module says which tensors and sizes each kernel takes. All of that is worked out
once per call signature (`signature`) into a launch program: a later call with the same signature is a
dictionary lookup, its allocations (the output, and one workspace for the statistics and partials) and
its launches, each through the compiled kernel's own entry once triton has compiled it
(gn_triton._compiled). docs/host-path.md has the measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from . import _compiled, _tuning, kernels
from ._launches import Launch, plan_launches
from ._plan import Affine, Plan, Problem, memory_format

# The kernels by name, as the launch table names them.
KERNELS = {name: getattr(kernels, name) for name in kernels.__all__ if name.endswith("_kernel")}
_MAX_PROGRAMS = 4096  # signatures kept; past that the cache starts again (a process with ever-new shapes)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`t` laid out densely in `fmt` (no copy when it already is; stride-0 gradients get one)."""
    return t.contiguous(memory_format=fmt)


@functools.lru_cache(maxsize=64)
def eps_pair(eps: float) -> tuple[float, float]:
    """eps as two fp32 values whose sum is eps to ~2^-48 relative: Triton passes Python floats as
    fp32, and fp64 kernels add the pair in fp64 (fp32 kernels see eps_hi alone, to the last bit)."""
    hi = torch.tensor(eps, dtype=torch.float32).item()
    # eps beyond fp32's range (1e39, inf) is inf in fp32: rstd is 0 and y the bias, as torch gives (to
    # ~1e-19 for a finite eps); eps - inf would be -inf, and the pair's sum NaN.
    return hi, eps - hi if abs(hi) < float("inf") else 0.0


def _tensors(affine: Affine) -> tuple[torch.Tensor | None, ...]:
    return affine.weight, affine.bias, affine.scale, affine.shift


def _dense_params(affine: Affine) -> Affine:
    """weight, bias (C,) and scale, shift (N, C) as dense rows, the kernels' `W + c` and `Scale + n*C + c`
    addressing (tiny: a copy only for a strided, transposed or expanded view)."""
    weight, bias, scale, shift = (None if t is None else t.contiguous() for t in _tensors(affine))
    return Affine(weight, bias, scale, shift, affine.activation)


def empty_outputs(x: torch.Tensor, num_groups: int, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The forward op's outputs, unfilled: y (out_dtype, default x's, in x's memory format) and (N, G)
    mean, mean_lo and rstd in the statistics dtype. What the op's real and fake implementations return."""
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=memory_format(x))
    return (y, *_empty_stats(x, num_groups))


def _empty_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty((x.shape[0], num_groups), dtype=stats_dtype(x), device=x.device) for _ in range(3))


def empty_grads(x: torch.Tensor, affine: Affine, output_mask: Sequence[bool]) -> tuple[torch.Tensor, ...]:
    """The backward op's outputs, unfilled: (dx, dweight, dbias, dscale, dshift) of their tensors' shapes
    and dtypes, dx in x's memory format and the others dense (the kernels write them as such, whatever
    the strides of a parameter's view); one not asked for in `output_mask`, or of a tensor that is
    None, is empty. What the op's real and fake implementations return."""
    grads = _new_grads(x, memory_format(x), _tensors(affine), output_mask)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _new_grads(x, fmt, tensors, needs) -> tuple[torch.Tensor | None, ...]:
    """dx (x's memory format) and the parameters' gradients (dense) that `needs` asks for, else None."""
    need_dx, need_dw, need_db, need_dscale, need_dshift = needs
    w, b, scale, shift = tensors
    dense = torch.contiguous_format
    return (torch.empty_like(x, memory_format=fmt) if need_dx else None,
            torch.empty_like(w, memory_format=dense) if need_dw and w is not None else None,
            torch.empty_like(b, memory_format=dense) if need_db and b is not None else None,
            torch.empty_like(scale, memory_format=dense) if need_dscale and scale is not None else None,
            torch.empty_like(shift, memory_format=dense) if need_dshift and shift is not None else None)  # fmt: skip


# --- launch programs --------------------------------------------------------------------------------


def meta(t: torch.Tensor | None) -> tuple | None:
    """What of a tensor argument decides the launches: shape, strides, dtype, device, and whether its
    address is 16-byte aligned (triton specialises a pointer on it)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def signature(x: torch.Tensor, num_groups: int, tensors: Sequence, activation, out_dtype: torch.dtype) -> tuple:
    """A forward call's signature: everything its plan, launches and triton's specialisation of the
    kernels' arguments depend on (every integer argument follows from the shapes). Also the current
    CUDA device, which triton launches on, and a forced plan (tests)."""
    device = torch.cuda.current_device() if x.is_cuda else None
    return (meta(x), num_groups, *map(meta, tensors), activation, out_dtype, device, _tuning.override_key)


class _Step:
    """One launch of a program. Through triton's `JITFunction.run` (which compiles the kernel, or
    interprets it) until it has compiled once; then through the compiled kernel's own entry where
    gn_triton._compiled gives one. `arguments` builds the kernel's positional arguments from a call's
    values (tensors, or addresses where a program carves its workspace)."""

    __slots__ = ("kernel", "grid", "constexprs", "arguments", "compiled")

    def __init__(self, launch: Launch, arguments: Callable[[tuple], tuple]) -> None:
        self.kernel, self.grid, self.constexprs = launch.kernel, launch.grid, launch.constexprs
        self.arguments = arguments
        self.compiled: Callable[[tuple], None] | None = None

    def launch_jit(self, values: tuple) -> None:
        args = self.arguments(values)
        kernel = KERNELS[self.kernel]
        binary = kernel[self.grid](*args, **self.constexprs)
        if self.compiled is None:
            self.compiled = _compiled.entry(kernel, binary, self.grid, args, self.constexprs)


class _Program:
    """The steps of one signature, and where a call's workspace holds what."""

    steps: list[_Step]
    compiled = False  # every step has its compiled entry

    def _jit(self) -> bool:
        """Whether this call launches through JITFunction.run (values must then be tensors)."""
        return not self.compiled or _compiled.hooks_set()

    def _launch(self, values: tuple, jit: bool) -> None:
        if jit:
            for step in self.steps:
                step.launch_jit(values)
            self.compiled = all(step.compiled is not None for step in self.steps)
        else:
            for step in self.steps:
                step.compiled(step.arguments(values))  # type: ignore[misc]  # not None: self.compiled says so


class _Workspace:
    """Where a program's workspace holds its pieces: (offset, length) of each, in elements."""

    def __init__(self, layout: Sequence[tuple[int, int]], dtype: torch.dtype) -> None:
        self.layout = list(layout)
        self.numel = max(offset + length for offset, length in layout)
        self.byte_offsets = [offset * dtype.itemsize for offset, _ in layout]

    def carve(self, work: torch.Tensor, jit: bool) -> tuple:
        """The pieces of `work`: 1-D views for JITFunction.run, addresses for the compiled entries (no
        view to make)."""
        if jit:
            return tuple(work[offset : offset + length] for offset, length in self.layout)
        base = work.data_ptr()
        return tuple(base + offset for offset in self.byte_offsets)


def _pointers(x: torch.Tensor, tensors: Sequence, dense: bool) -> tuple:
    """weight, bias, scale and shift as the kernels take them: dense rows (the kernels' `W + c` and
    `Scale + n*C + c` addressing; a copy only for a strided or expanded view, unless `dense`), and x
    in place of one that is None (its kernel flag is off: never read)."""
    w, b, scale, shift = tensors
    if not dense:
        w, b, scale, shift = (None if t is None else t.contiguous() for t in tensors)
    return (x if w is None else w, x if b is None else b, x if scale is None else scale,
            x if shift is None else shift)  # fmt: skip


def _stats_layout(p: Problem, acc: torch.dtype) -> tuple[list[tuple[int, int]], int]:
    """(offset, length) of mean, mean_lo and rstd in a forward's workspace, each 16-byte aligned, and
    where the partials after them begin."""
    align = 16 // acc.itemsize
    rows = -(-p.rows // align) * align
    return [(0, p.rows), (rows, p.rows), (2 * rows, p.rows)], 3 * rows


def _dense_flags(x: torch.Tensor, fmt: torch.memory_format, *others: torch.Tensor | None) -> tuple[bool, ...]:
    """Whether x is dense in fmt, and each other tensor (None counts as dense) in the default format."""
    return (x.is_contiguous(memory_format=fmt), *(t is None or t.is_contiguous() for t in others))


def _forward_steps(p: Problem, plan: Plan) -> tuple[list[_Step], int]:
    """The forward's steps and its partials' length (elements; 0 on the fused path). A call's values:
    (x, y, w, b, scale, shift, mean, mean_lo, rstd, partials, eps_hi, eps_lo)."""
    sizes = (p.C, p.S, p.G, p.Cg)
    span, spans = plan.span(p.S)  # one span (spans = 1) on the fused path
    pieces = spans * plan.chunk(p)[1]  # one partial per group and (chunk, span) piece

    def fused(v):
        x, y, w, b, scale, shift, mean, mean_lo, rstd, _, eps_hi, eps_lo = v
        return x, y, w, b, scale, shift, mean, mean_lo, rstd, *sizes, eps_hi, eps_lo

    def partial_stats(offset):
        return lambda v: (v[0], v[9], offset, *sizes, span, pieces)

    def apply(offset):
        def arguments(v):
            x, y, w, b, scale, shift, mean, mean_lo, rstd, partials, eps_hi, eps_lo = v
            return x, y, w, b, scale, shift, partials, mean, mean_lo, rstd, offset, *sizes, span, pieces, eps_hi, eps_lo

        return arguments

    builders = {"_gn_fwd_fused_kernel": lambda _: fused, "_gn_fwd_partial_stats_kernel": partial_stats,
                "_gn_fwd_split_apply_kernel": apply}  # fmt: skip
    steps = [_Step(launch, builders[launch.kernel](launch.offset)) for launch in plan_launches("fwd", p, plan)]
    return steps, (p.rows * pieces * 4 if plan.split > 1 else 0)


def _backward_steps(p: Problem, plan: Plan, needs: Sequence[bool]) -> tuple[list[_Step], int]:
    """The backward's steps and its partials' length (per-(n, c, span) sums of dz and dz*(x - mean): the
    split dx's and the parameter gradients' input; 0 when neither needs them). A call's values: (x, dy,
    dx, w, b, scale, shift, mean, mean_lo, rstd, partials, dw, db, dscale, dshift)."""
    sizes = (p.C, p.S, p.G, p.Cg)
    span, spans = plan.span(p.S)  # one span (spans = 1) on the fused path

    def fused(v):
        x, dy, dx, w, b, scale, shift, mean, mean_lo, rstd, partials = v[:11]
        return x, dy, dx, w, b, scale, shift, mean, mean_lo, rstd, partials, *sizes

    def partial_sums(offset):
        def arguments(v):
            x, dy, _, w, b, scale, shift, mean, mean_lo, rstd, partials = v[:11]
            return x, dy, w, b, scale, shift, mean, mean_lo, rstd, partials, offset, *sizes, span, spans

        return arguments

    def split_dx(offset):
        return lambda v: (*v[:11], offset, *sizes, span, spans)

    def dparams(v):
        _, _, _, _, _, scale, _, _, mean_lo, rstd, partials, dw, db = v[:13]
        return partials, mean_lo, rstd, scale, dw, db, p.N, p.C, p.G, p.Cg, spans

    def dscale_shift(v):
        _, _, _, w, b, _, _, _, mean_lo, rstd, partials, _, _, dscale, dshift = v
        return partials, w, b, mean_lo, rstd, dscale, dshift, p.C, p.G, p.Cg, spans

    builders = {"_gn_bwd_fused_kernel": lambda _: fused, "_gn_bwd_partial_sums_kernel": partial_sums,
                "_gn_bwd_split_dx_kernel": split_dx, "_gn_bwd_dparams_kernel": lambda _: dparams,
                "_gn_bwd_dscale_shift_kernel": lambda _: dscale_shift}  # fmt: skip
    steps = [_Step(launch, builders[launch.kernel](launch.offset)) for launch in plan_launches("bwd", p, plan, needs)]
    needs_partials = plan.split > 1 or any(needs[1:])
    return steps, (p.N * p.C * spans * 2 if needs_partials else 0)


class ForwardProgram(_Program):
    """The forward of one signature: y = act((x_hat*w + b)*(1 + scale) + shift) and the (N, G)
    statistics, with the plan chosen at its first call (timed there when autotuning)."""

    def __init__(self, key: tuple, x: torch.Tensor, num_groups: int, affine: Affine, out_dtype, plan: Plan) -> None:
        self.key = key
        self.fmt = memory_format(x)
        self.x_dense, *params_dense = _dense_flags(x, self.fmt, *_tensors(affine))
        self.params_dense = all(params_dense)
        self.out_dtype = out_dtype
        self.acc = stats_dtype(x)
        self.num_groups, self.activation = num_groups, affine.activation
        self.problem = p = Problem.of(x, num_groups, affine, out_dtype)
        self.plan = plan.fit(p)
        self.steps, partials = _forward_steps(p, self.plan)
        stats, end = _stats_layout(p, self.acc)
        self.stats = _Workspace(stats, self.acc)  # mean, mean_lo, rstd
        self.work = _Workspace([*stats, (end, max(partials, 1))], self.acc)  # ... and the partials
        self.partials = _Workspace([(0, partials)], self.acc) if partials else None  # alone
        self.backward: dict[tuple, BackwardProgram] = {}  # by dy's signature and the gradients asked for
        # Which of (weight, bias, scale, shift) the signature has: the others are None in every call.
        self.present = tuple(i for i, t in enumerate(_tensors(affine)) if t is not None)

    def tensors(self, present: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """(weight, bias, scale, shift) from those of them that are present."""
        tensors: list[torch.Tensor | None] = [None, None, None, None]
        for i, t in zip(self.present, present):
            tensors[i] = t
        return tuple(tensors)

    def needs(self, needs_input_grad: Sequence[bool]) -> tuple[bool, ...]:
        """The gradients (dx, dweight, dbias, dscale, dshift) an autograd Function of (x, _, _, *present)
        is asked for."""
        needs = [needs_input_grad[0], False, False, False, False]
        for i, need in zip(self.present, needs_input_grad[3:]):
            needs[1 + i] = need
        return tuple(needs)

    def __call__(self, x: torch.Tensor, tensors: Sequence, eps: float, stats: Sequence | None = None):
        """(y, work): y, and the statistics in `stats` (three (N, G) tensors) where given, else in a
        workspace `work` of their own (`statistics(work)` views them)."""
        if not self.x_dense:
            x = x.contiguous(memory_format=self.fmt)
        y = torch.empty_like(x, dtype=self.out_dtype, memory_format=self.fmt)
        jit = self._jit()
        if stats is None:
            work = torch.empty(self.work.numel, dtype=self.acc, device=x.device)
            mean, mean_lo, rstd, partials = self.work.carve(work, jit)
        else:
            work, (mean, mean_lo, rstd) = None, stats
            partials = x if self.partials is None else torch.empty(self.partials.numel, dtype=self.acc, device=x.device)
        w, b, scale, shift = _pointers(x, tensors, self.params_dense)
        eps_hi, eps_lo = eps_pair(eps)
        self._launch((x, y, w, b, scale, shift, mean, mean_lo, rstd, partials, eps_hi, eps_lo), jit)
        return y, work

    def statistics(self, work: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mean, mean_lo, rstd) of a workspace this program filled, as (N, G) views."""
        shape = (self.problem.N, self.problem.G)
        return tuple(piece.view(shape) for piece in self.stats.carve(work, jit=True))

    def backward_program(self, dy, x, tensors: Sequence, work: torch.Tensor, needs: Sequence[bool]) -> BackwardProgram:
        """The backward of this forward for gradients like dy, reading the statistics from its workspace."""
        key = (meta(dy), *needs)
        program = self.backward.get(key)
        if program is None:
            weight, bias, scale, shift = tensors
            affine = Affine(weight, bias, scale, shift, self.activation)
            program = _plan_backward(x, dy, self.num_groups, affine, needs, self.stats, work)
            keep(self.backward, key, program, x.device)
        return program


class BackwardProgram(_Program):
    """The backward of one signature: (dx, dweight, dbias, dscale, dshift), None where not asked for."""

    def __init__(self, x, dy, num_groups, affine: Affine, needs, stats: _Workspace | None, plan: Plan) -> None:
        self.fmt = memory_format(x)
        tensors = _tensors(affine)
        self.x_dense, self.dy_dense, *params_dense = (*_dense_flags(x, self.fmt), *_dense_flags(dy, self.fmt, *tensors))
        self.params_dense = all(params_dense)
        self.needs = tuple(need and t is not None for need, t in zip(needs, (x, *tensors)))
        self.acc = stats_dtype(x)
        p = Problem.of(x, num_groups, affine, dy.dtype)
        self.plan = plan.fit(p)
        self.steps, partials = _backward_steps(p, self.plan, self.needs)
        self.partials = _Workspace([(0, partials)], self.acc) if partials else None
        self.stats = stats  # where the statistics are in the forward's workspace (None: given as tensors)

    def __call__(self, dy, x, tensors: Sequence, stats) -> tuple[torch.Tensor | None, ...]:
        """The gradients, from the forward's workspace (self.stats) or three (N, G) tensors."""
        if not self.x_dense:
            x = x.contiguous(memory_format=self.fmt)
        if not self.dy_dense:
            dy = dy.contiguous(memory_format=self.fmt)
        grads = _new_grads(x, self.fmt, tensors, self.needs)
        jit = self._jit()
        if self.stats is not None:
            stats = self.stats.carve(stats, jit)
        partials = x if self.partials is None else torch.empty(self.partials.numel, dtype=self.acc, device=x.device)
        w, b, scale, shift = _pointers(x, tensors, self.params_dense)
        dx, dw, db, dscale, dshift = grads
        mean, mean_lo, rstd = stats
        self._launch((x, dy, x if dx is None else dx, w, b, scale, shift, mean, mean_lo, rstd, partials,
                      x if dw is None else dw, x if db is None else db, x if dscale is None else dscale,
                      x if dshift is None else dshift), jit)  # fmt: skip
        return grads


_FORWARD: dict[tuple, ForwardProgram] = {}
_BACKWARD: dict[tuple, BackwardProgram] = {}


def keep(cache: dict, key: tuple, program, device: torch.device):
    """Keep `program` under `key` (not one planned provisionally, see _tuning.provisional)."""
    if _tuning.provisional(device):
        return program
    if len(cache) >= _MAX_PROGRAMS:
        cache.clear()
    cache[key] = program
    return program


def forward_program(x: torch.Tensor, num_groups: int, eps: float, affine: Affine, out_dtype: torch.dtype,
                    key: tuple | None = None) -> ForwardProgram:  # fmt: skip
    """The program of this call's signature (`key`, computed if not given): planned at its first call,
    on this call's tensors when the plan is autotuned."""
    key = key or signature(x, num_groups, _tensors(affine), affine.activation, out_dtype)
    program = _FORWARD.get(key)
    if program is None:
        p = Problem.of(x, num_groups, affine, out_dtype)
        tensors = _tensors(affine)

        def timed(plan: Plan) -> None:  # an autotuning candidate
            ForwardProgram(key, x, num_groups, affine, out_dtype, plan)(x, tensors, eps)

        plan = _tuning.choose_plan("fwd", p, x.device, timed)
        program = keep(_FORWARD, key, ForwardProgram(key, x, num_groups, affine, out_dtype, plan), x.device)
    return program


def _plan_backward(x, dy, num_groups: int, affine: Affine, needs, workspace, stats) -> BackwardProgram:
    """A backward program for this call (its candidates timed on this call's tensors when autotuning)."""
    p = Problem.of(x, num_groups, affine, dy.dtype)
    tensors = _tensors(affine)
    effective = tuple(need and t is not None for need, t in zip(needs, (x, *tensors)))

    def timed(plan: Plan) -> None:  # an autotuning candidate
        BackwardProgram(x, dy, num_groups, affine, needs, workspace, plan)(dy, x, tensors, stats)

    plan = _tuning.choose_plan("bwd", p, x.device, timed, needs=effective)
    return BackwardProgram(x, dy, num_groups, affine, needs, workspace, plan)


def gn_fwd(
    x: torch.Tensor, num_groups: int, eps: float, affine: Affine, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm forward with what follows it (`affine`). Returns (y, mean, mean_lo, rstd): y in
    out_dtype (default x's: the kernels read x and store y each in its own dtype); the stats are (N, G)
    in fp32 (fp64 for fp64 input), mean is the group mean rounded to that dtype and mean_lo the
    rounding residual."""
    out_dtype = out_dtype or x.dtype
    if x.numel() == 0:
        y, mean, mean_lo, rstd = empty_outputs(x, num_groups, out_dtype)
        for t in (mean, mean_lo, rstd):  # like torch: an empty group has NaN statistics
            t.fill_(float("nan"))
        return y, mean, mean_lo, rstd
    stats = mean, mean_lo, rstd = _empty_stats(x, num_groups)
    y, _ = forward_program(x, num_groups, eps, affine, out_dtype)(x, _tensors(affine), eps, stats)
    return y, mean, mean_lo, rstd


def gn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    affine: Affine,
    mean: torch.Tensor,
    mean_lo: torch.Tensor,
    rstd: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, ...]:
    """Backward of gn_fwd: (dx, dweight, dbias, dscale, dshift). A gradient not asked for in
    `output_mask`, or of a tensor that is None, comes back as an empty tensor and costs nothing."""
    tensors = _tensors(affine)
    needs = tuple(bool(need) and t is not None for need, t in zip(output_mask, (x, *tensors)))
    if x.numel() == 0 or not any(needs):
        empty = empty_grads(x, affine, needs)
        for g in empty[1:]:  # no positions: the parameters' gradients are zero
            g.zero_()
        return empty
    stats = tuple(t.contiguous() for t in (mean, mean_lo, rstd))  # e.g. expanded by vmap (tiny)
    key = (signature(x, num_groups, tensors, affine.activation, grad_out.dtype), meta(grad_out),
           *map(meta, stats), *needs)  # fmt: skip
    program = _BACKWARD.get(key)
    if program is None:
        program = _plan_backward(x, grad_out, num_groups, affine, needs, None, stats)
        keep(_BACKWARD, key, program, x.device)
    grads = program(grad_out, x, tensors, stats)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _run(launches: list[Launch], arguments: dict) -> None:
    """Each launch of the table, with the positional arguments its kernel takes (arguments[kernel](offset)):
    the parts' launches (gn_triton._parts), which are not cached programs."""
    for launch in launches:
        KERNELS[launch.kernel][launch.grid](*arguments[launch.kernel](launch.offset), **launch.constexprs)
