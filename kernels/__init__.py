"""Triton device code of gn_triton (installed as ``gn_triton.kernels``; imports triton only)."""

import hashlib
from pathlib import Path

from ._tile import Epilogue, Layout
from .gn_bwd import (
    _gn_bwd_dparams_kernel,
    _gn_bwd_dscale_shift_kernel,
    _gn_bwd_fused_kernel,
    _gn_bwd_partial_sums_kernel,
    _gn_bwd_split_dx_kernel,
)
from .gn_fwd import _gn_fwd_fused_kernel, _gn_fwd_partial_stats_kernel, _gn_fwd_split_apply_kernel
from .gn_parts import _gn_dx_kernel, _gn_normalize_kernel


def kernel_version() -> str:
    """A short content hash of the kernels' source (this folder's .py files): what a GPU run records
    so that its figures can be matched with the kernels they measured."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


KERNEL_VERSION = kernel_version()

__all__ = [
    "KERNEL_VERSION",
    "Epilogue",
    "Layout",
    "_gn_bwd_dparams_kernel",
    "_gn_bwd_dscale_shift_kernel",
    "_gn_bwd_fused_kernel",
    "_gn_bwd_partial_sums_kernel",
    "_gn_bwd_split_dx_kernel",
    "_gn_dx_kernel",
    "_gn_fwd_fused_kernel",
    "_gn_fwd_partial_stats_kernel",
    "_gn_fwd_split_apply_kernel",
    "_gn_normalize_kernel",
    "kernel_version",
]
