"""Triton device code of gn_triton (installed as ``gn_triton.kernels``; imports triton only)."""

from ._tile import Epilogue, Layout
from .gn_bwd import (
    _gn_bwd_dparams_kernel,
    _gn_bwd_dscale_shift_kernel,
    _gn_bwd_fused_kernel,
    _gn_bwd_partial_sums_kernel,
    _gn_bwd_split_dx_kernel,
)
from .gn_fwd import _gn_fwd_fused_kernel, _gn_fwd_partial_stats_kernel, _gn_fwd_split_apply_kernel

__all__ = [
    "Epilogue",
    "Layout",
    "_gn_bwd_dparams_kernel",
    "_gn_bwd_dscale_shift_kernel",
    "_gn_bwd_fused_kernel",
    "_gn_bwd_partial_sums_kernel",
    "_gn_bwd_split_dx_kernel",
    "_gn_fwd_fused_kernel",
    "_gn_fwd_partial_stats_kernel",
    "_gn_fwd_split_apply_kernel",
]
