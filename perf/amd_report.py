"""The static report's AMD part: compile a spec ahead of time for an AMD Instinct GPU (gfx942: MI300X
and MI325X; gfx950: MI355X), no GPU and no ROCm install needed (triton bundles what it needs), and read
the amdgcn text triton produces: VGPRs, scratch (spill) bytes, LDS bytes, and the width of every global
load (global_load_dwordx4 or buffer_load_dwordx4 = 128-bit, vectorised).

    python -m perf.static_report --quick --target gfx942,gfx950
"""

from __future__ import annotations

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gn_triton import _cost, kernels

# The device model whose plans are compiled for each architecture (perf.static_report.all_specs).
DEVICE_OF_ARCH = {"gfx942": "mi300x", "gfx950": "mi355x"}
WAVEFRONT = 64

_LOAD = re.compile(r"\b(?:global|buffer)_load_(?:lds_)?(\w+)")  # vector memory loads (s_load_* are scalar)
_WIDTHS = {"ubyte": 8, "sbyte": 8, "ushort": 16, "sshort": 16, "short": 16, "dword": 32, "dwordx2": 64,
           "dwordx3": 96, "dwordx4": 128, "u8": 8, "i8": 8, "u16": 16, "i16": 16, "b32": 32, "b64": 64,
           "b96": 96, "b128": 128}  # fmt: skip


def device_for(arch: str) -> _cost.DeviceModel:
    """The modelled AMD device that plans for `arch` (gfx942 or gfx950)."""
    return _cost.DEVICES[DEVICE_OF_ARCH[arch]]


def load_widths(amdgcn: str) -> list[int]:
    """The width in bits of every global (or buffer) load in an amdgcn listing, e.g.
    global_load_ushort (16), buffer_load_dword (32), global_load_dwordx4 (128), global_load_short_d16 (16)."""
    widths = []
    for suffix in _LOAD.findall(amdgcn):
        kind = suffix.split("_")[0]
        widths.append(_WIDTHS.get(kind, 32))
    return widths


def _field(amdgcn: str, name: str) -> int:
    """The first `; Name: value` comment of the listing (one kernel per listing)."""
    return int(re.search(rf"^\s*; {name}: (\d+)", amdgcn, re.MULTILINE).group(1))


def compile_and_inspect(spec, arch: str, signature: tuple[dict, dict, dict], row: dict) -> dict:
    """Compile one spec for `arch`; VGPRs as registers, scratch bytes as spills, LDS bytes as shared
    memory, and the widest and number of global loads (perf.static_report's columns)."""
    fn = getattr(kernels, spec.kernel)
    row = dict(row, arch=arch)
    try:
        compiled = triton.compile(
            ASTSource(fn, *signature), target=GPUTarget("hip", arch, WAVEFRONT), options=dict(num_warps=spec.num_warps)
        )
    except Exception as exc:  # report it: a kernel the compiler rejects is what this report is for
        return dict(row, error=f"{type(exc).__name__}: {exc}"[:500])
    amdgcn = compiled.asm["amdgcn"]
    widths = load_widths(amdgcn)
    return dict(row, registers=_field(amdgcn, "NumVgprs"), spill_bytes=_field(amdgcn, "ScratchSize"),
                shared_bytes=_field(amdgcn, "LDSByteSize"), widest_load_bits=max(widths, default=0),
                global_loads=len(widths))  # fmt: skip
