"""Opt-in torch.compile pass: GroupNorm and what follows it become one gn_triton op.

    with gn_triton.enable_compile_fusion():        # or call it once; disable_compile_fusion() undoes
        model = torch.compile(model)

For each `F.group_norm` / `torch.group_norm` of the graph Dynamo captured (nn.GroupNorm is inlined
to F.group_norm there) whose input runs on gn_triton's kernels, the pass calls the custom op
`gn_triton::group_norm_fwd` instead and folds into it, while each step's result has no other user:
the per-sample modulation `y * (1 + s) + t` with s, t of shape (N, C, 1, ..., 1) (a multiplier
written as `1 + s` or `s + 1`; any other multiplier m stays a multiply in the graph, exact, and ends
the fused chain there: folding it as scale = m - 1 would lose a small m), then SiLU or GELU (erf or
tanh). That is the order the
kernel applies them in, and the form of diffusers' ResnetBlock2D (norm, optional scale-shift, SiLU).

Which hook, and why: Inductor's pre-grad custom pass (`torch._inductor.config.pre_grad_custom_pass`,
a `CustomGraphPass` with a uuid() so the FX graph and AOTAutograd caches stay valid). It runs on the
torch-level graph before AOTAutograd, where group_norm, silu and the modulation are still single
nodes. AOTAutograd then differentiates the inserted op through the autograd formula registered on
it (gn_triton.autograd, torch.library.register_autograd), so the backward of x, weight, bias, scale
and shift is gn_triton's backward op: exact, with nothing activation-sized saved beyond x. The
later hooks see too late a graph: in the joint and post-grad graphs (joint_custom_pre_pass,
post_grad_custom_pre_pass) group_norm and its backward are already decomposed into Inductor's own
reductions, which would have to be pattern-matched back in both directions. The pre-grad hook
and CustomGraphPass are Inductor's documented extension points, present in every torch the project
supports (2.11 and 2.13 are tested); the pass uses no other private Inductor API. One pass object is
installed, the form every version calls (newer ones also take a list), and a pass the user had
installed runs first inside it.

Autocast: a group_norm whose output Dynamo recorded as fp32 for 16-bit input (CUDA autocast runs it
in fp32) becomes the op with out_dtype=fp32, which reads the 16-bit input and writes fp32 as torch
does; any other change of dtype is left to Inductor.

Forward-mode AD: torch.library has no forward-mode formula for custom ops, and no graph compiled by
AOTAutograd supports torch.autograd.forward_ad either (torch raises NotImplementedError for any
compiled model, fused or not), so the pass never meets it silently; torch.func.jvp of a compiled
function runs it eagerly.

Limits: compilations that happen while enabled (a model compiled before keeps its graph until
torch.compiler.reset(); a recompile after a `with enable_compile_fusion():` block ended, e.g. for a new
batch size, runs without the pass: Inductor reads the pass from its configuration at each compilation;
torch.compile(..., options=fusion_options()) keeps the pass with the compiled function); the Inductor
backend (other backends, and torch.export, do not run Inductor's passes: export a converted model
instead); inputs gn_triton does not run on are left to Inductor.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _checks, _ops
from ._checks import INTERPRET
from ._switch import Switch

_GROUP_NORMS = (F.group_norm, torch.group_norm)
_GROUP_NORM_PARAMS = ("input", "num_groups", "weight", "bias", "eps")  # shared by both signatures
_MULS = (operator.mul, torch.mul)
_ADDS = (operator.add, torch.add)
_SILUS = (F.silu, torch._C._nn.silu)
_GELUS = (F.gelu,)  # F.gelu is torch._C._nn.gelu: what nn.GELU calls
_GELU_APPROXIMATIONS: dict[Any, str] = {"none": "gelu", "tanh": "gelu_tanh"}


def fuse_group_norms(graph: Graph) -> int:
    """Rewrite `graph` (a Dynamo graph, its nodes carrying `example_value`) in place as described in
    the module docstring; returns how many group_norm nodes now call gn_triton's op. Nodes without
    example values (e.g. from torch.fx.symbolic_trace) are left alone."""
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in _GROUP_NORMS]
    return sum(_replace(graph, n) for n in nodes)


def _value(arg: Any) -> Any:
    return arg.meta.get("example_value") if isinstance(arg, Node) else None


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _binary(node: Node, functions: tuple[Callable, ...], method: str) -> tuple[Any, Any] | None:
    """The two operands of `a <op> b`, torch.<op>(a, b) or a.<op>(b) (no alpha, no out)."""
    is_call = node.op == "call_function" and node.target in functions
    if (is_call or (node.op == "call_method" and node.target == method)) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _other_operand(node: Node | None, functions: tuple[Callable, ...], method: str, y: Node) -> Any:
    """For `y <op> other` (either order) return other, else None."""
    operands = None if node is None else _binary(node, functions, method)
    if operands is None or operands.count(y) != 1:
        return None
    return operands[1] if operands[0] is y else operands[0]


def _per_sample(arg: Any, y: torch.Tensor) -> bool:
    """arg is a tensor node of shape (N, C, 1, ..., 1) against y (N, C, *), with y's dtype and device,
    so `y <op> arg` neither broadcasts y nor promotes its dtype. Sizes may be symbolic (dynamic
    batch): statically_known_true adds no guard."""
    v = _value(arg)
    if not isinstance(v, torch.Tensor) or v.dim() != y.dim() or v.dtype != y.dtype or v.device != y.device:
        return False
    same_nc = all(statically_known_true(a == b) for a, b in zip(v.shape[:2], y.shape[:2]))
    return same_nc and all(statically_known_true(s == 1) for s in v.shape[2:])


def _one_plus(arg: Node) -> Node | None:
    """s for a node `1 + s` or `s + 1`."""
    operands = _binary(arg, _ADDS, "add")
    if operands is None:
        return None
    for one, s in (operands, operands[::-1]):
        if type(one) in (int, float) and one == 1 and isinstance(s, Node):
            return s
    return None


def _activation(node: Node | None, y: Node) -> str | None:
    """The kernel's name of the activation `node` applies to y alone, else None."""
    if node is None or node.op != "call_function" or not node.args or node.args[0] is not y:
        return None
    if node.target in _SILUS and len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}:
        return "silu"
    if node.target in _GELUS and len(node.args) <= 2 and set(node.kwargs) <= {"approximate"}:
        approximate = node.args[1] if len(node.args) == 2 else node.kwargs.get("approximate", "none")
        return _GELU_APPROXIMATIONS.get(approximate)
    return None


def _replace(graph: Graph, gn: Node) -> bool:
    args: dict[str, Any] = dict(zip(_GROUP_NORM_PARAMS, gn.args), **gn.kwargs)
    x, num_groups, eps = args["input"], args["num_groups"], args.get("eps", 1e-5)
    x_val, y_val = _value(x), _value(gn)
    if not (
        isinstance(x_val, torch.Tensor)
        and isinstance(y_val, torch.Tensor)
        and type(num_groups) is int
        and type(eps) in (int, float)
        and x_val.dtype in _checks.SUPPORTED_DTYPES
        and _checks.runs_on_kernels(x_val)
    ):
        return False
    # Under CUDA autocast torch's group_norm turns 16-bit input into fp32 output: the op does the same
    # (it reads the 16-bit input and writes fp32). Any other change of dtype is left to torch.
    out_dtype = y_val.dtype
    widened = x_val.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32
    if out_dtype != x_val.dtype and not widened:
        return False

    # Walk the chain gn -> [* m] -> [+ t] -> [activation], each step the previous one's only user.
    chain: list[Any] = [gn]  # Nodes: each user appended is one (mypy cannot tell it is not None)
    one_plus, scale, shift = None, None, None
    user = _only_user(gn)
    m = _other_operand(user, _MULS, "mul", gn)
    # Only a multiplier written as `1 + s` is folded (as scale = s): any other m would have to become
    # m - 1, which the kernel turns back into 1 + (m - 1), losing m where it is small (m = 1e-8 in fp32
    # gives 0). Such a multiply stays in the graph, and so does what follows it.
    if _per_sample(m, y_val) and (s := _one_plus(m)) is not None and _per_sample(s, y_val):
        one_plus, scale, chain = m, s, [*chain, user]
    user = _only_user(chain[-1])
    if _per_sample(t := _other_operand(user, _ADDS, "add", chain[-1]), y_val):
        shift, chain = t, [*chain, user]
    user = _only_user(chain[-1])
    if (activation := _activation(user, chain[-1])) is not None:
        chain.append(user)

    end = chain[-1]
    with graph.inserting_before(end):  # every operand of the chain is defined before its last node
        scale_node = shift_node = None
        if scale is not None:
            scale_node = graph.call_method("flatten", (scale, 1))  # (N, C, 1, ..., 1) -> (N, C)
        if shift is not None:
            shift_node = graph.call_method("flatten", (shift, 1))
        fused = graph.call_function(
            getattr(torch.ops, _ops.NAMESPACE).group_norm_fwd.default,
            (x, args.get("weight"), args.get("bias"), num_groups, float(eps), activation, scale_node, shift_node,
             None if out_dtype == x_val.dtype else out_dtype),
        )  # fmt: skip
        y = graph.call_function(operator.getitem, (fused, 0))
    y.meta["example_value"] = _value(end)
    end.replace_all_uses_with(y)
    for node in reversed(chain):
        graph.erase_node(node)
    if one_plus is not None and not one_plus.users:
        graph.erase_node(one_plus)  # the `1 + s` the op now computes itself
    return True


def _file_hash(paths: Sequence[Path]) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


# What the pass's output depends on: this file, the ops' schema, namespace and autograd, and whether CPU
# tensors run the kernels (the interpreter).
_HERE = Path(__file__).parent
_UUID = (_file_hash([_HERE / "compile_fusion.py", _HERE / "_ops.py", _HERE / "autograd.py"])
         + f"-{_ops.NAMESPACE}-interpret={INTERPRET}")  # fmt: skip


class _FusionPass(CustomGraphPass):
    """The installed pre-grad pass: runs the pass that was installed before it (if any), then ours."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        # torch 2.13 also accepts a list of passes there
        self._before = tuple(previous) if isinstance(previous, (list, tuple)) else (previous,) if previous else ()

    def __call__(self, graph: Graph) -> None:
        for p in self._before:
            p(graph)
        fuse_group_norms(graph)

    def uuid(self) -> Any:
        before = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self._before]
        return None if None in before else (_UUID, *before)  # None: a pass we cannot hash disables caching


def _enabled() -> bool:
    return isinstance(inductor_config.pre_grad_custom_pass, _FusionPass)


def _set_enabled(enabled: bool) -> None:
    if enabled and not _enabled():
        inductor_config.pre_grad_custom_pass = _FusionPass(inductor_config.pre_grad_custom_pass)
    elif not enabled and _enabled():
        inductor_config.pre_grad_custom_pass = _installed_pass().previous


# torch 2.13's Inductor config holds each value per thread (a ContextVar): the pass enabled in one thread
# is not seen by compilations in another. torch 2.11's is one value for the process.
_PER_THREAD = isinstance(
    getattr(inductor_config._config.get("pre_grad_custom_pass"), "user_override", None),  # type: ignore[attr-defined]  # private, not in the stubs
    ContextVar,
)


def _installed_pass() -> Any:
    return inductor_config.pre_grad_custom_pass


def _install_pass(before: Any) -> None:  # one function: the switches of this setting are keyed by it
    inductor_config.pre_grad_custom_pass = before


def _switch(enabled: bool) -> Switch:
    """The pre-grad pass from before the call comes back when the switch is used as a context manager."""
    return Switch(_installed_pass, _install_pass, lambda: _set_enabled(enabled), per_thread=_PER_THREAD)


def fusion_options() -> dict[str, Any]:
    """torch.compile options that carry the pass with one compiled function, every recompilation
    included, whatever the switches say later:

        compiled = torch.compile(model, options=gn_triton.compile_fusion.fusion_options())

    (Inductor applies a compiled function's options at each of its compilations; the pass installed
    when this is called, if any and not gn_triton's, runs first, as with enable_compile_fusion.)"""
    installed = _installed_pass()
    return {"pre_grad_custom_pass": _FusionPass(installed.previous if _enabled() else installed)}


def enable_compile_fusion() -> Switch:
    """Make the torch.compile (Inductor) compilations that follow run gn_triton's GroupNorm with its
    epilogues fused (see gn_triton.compile_fusion). Idempotent; `with enable_compile_fusion():`
    enables it for the block only."""
    return _switch(True)


def disable_compile_fusion() -> Switch:
    """Undo enable_compile_fusion: later compilations use Inductor's own GroupNorm lowering again.
    Idempotent; also a context manager (disabled inside the block)."""
    return _switch(False)
