"""gn_triton: a drop-in torch.nn.GroupNorm for NVIDIA GPUs, written in Triton.

    import gn_triton
    y = gn_triton.group_norm(x, num_groups=32, weight=w, bias=b)   # like F.group_norm
    norm = gn_triton.GroupNorm(32, 320)                            # like nn.GroupNorm
    model = gn_triton.convert_model(model, activation_fusion=True)  # every nn.GroupNorm, in place
    gn_triton.backend_for(x)  # "kernels", "interpreter" or "torch": what a call on x runs
    gn_triton.enable_compile_fusion()  # torch.compile: GroupNorm (+ scale-shift, SiLU/GELU) as gn_triton's op
    gn_triton.enable_eager_override()  # eager: every aten group_norm it supports runs gn_triton's kernels
    gn_triton.distributed.group_norm(shard, 32, w, b)  # one sample sharded across processes (torch.distributed)
    gn_triton.stats.group_stats(x, 32)  # statistics as values: take, merge (merge_stats), apply (normalize)
    gn_triton.layers.GroupNorm  # a layer for the `kernels` package's kernelize (docs/distribution.md)

Importing touches no GPU.
"""

from . import _checks, _ops, layers  # noqa: F401  (_ops registers the custom ops; layers: for `kernels`' kernelize)
from ._checks import backend_for
from ._interpreter import fix_loop_bounds as _fix_loop_bounds
from ._version import __version__
from .functional import group_norm
from .modules import GroupNorm, convert_model, revert_model

__all__ = [
    "GroupNorm",
    "backend_for",
    "convert_model",
    "disable_compile_fusion",
    "disable_eager_override",
    "enable_compile_fusion",
    "enable_eager_override",
    "group_norm",
    "revert_model",
    "__version__",
]

if _checks.INTERPRET:
    _fix_loop_bounds()


def __getattr__(name: str):
    # The torch.compile switches import torch._inductor (~1.5 s): only when first used.
    if name in ("enable_compile_fusion", "disable_compile_fusion"):
        from . import compile_fusion

        return getattr(compile_fusion, name)
    if name in ("stats", "distributed"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in ("enable_eager_override", "disable_eager_override"):
        from . import eager_override

        return getattr(eager_override, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
