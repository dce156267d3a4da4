"""gn_triton: a faster drop-in torch.nn.GroupNorm for NVIDIA GPUs, written in Triton.

    import gn_triton
    y = gn_triton.group_norm(x, num_groups=32, weight=w, bias=b)   # like F.group_norm
    norm = gn_triton.GroupNorm(32, 320)                            # like nn.GroupNorm

Importing touches no GPU.
"""

from . import _ops  # noqa: F401  (registers the gn_triton:: custom ops)
from .functional import group_norm
from .modules import GroupNorm

__version__ = "0.1.0"
__all__ = ["GroupNorm", "group_norm", "__version__"]
