"""A traffic and launch cost model of a plan: the HBM bytes it moves and the time that takes.

GroupNorm is memory-bound, so a plan's cost is the bytes it moves through HBM and the launches it
issues. The model, per direction (forward reads x and writes y; backward reads x and dy, writes dx):

- **Floor**: every tensor read once and written once.
- **Second read.** Both paths read their data twice (statistics or gradient sums, then the
  normalisation or dx). The second read comes from the last-level cache when the bytes held in
  between fit its budget (half of it: the other half is left to the output's writes and the
  workspace), else the missing fraction comes from HBM again. The last level is the L2 on NVIDIA and
  the Infinity Cache on AMD Instinct (DeviceModel.cache_bytes):
    fused (one launch, a block per program): the bytes held are the resident programs' blocks;
    split (two launches per wave): the bytes held are the wave's blocks.
- **Sectors** (channels_last): a program reads each pixel's slice of its block, R*Cg elements; a
  slice narrower than a 32-byte sector still moves the whole sector.
- **Time**: HBM bytes over the copy bandwidth plus second reads served by L2 over L2's (faster)
  bandwidth, scaled down when a launch has fewer than two programs per SM (too few requests in
  flight to keep HBM busy), against the host's cost of the call (HOST_CALL_US, then HOST_LAUNCH_US
  per launch; it overlaps the GPU's work): time = max(GPU time, host time). A call whose host time
  is the larger is host-bound: the GPU waits for Python (explain says so).
- **Residency**: programs per SM (a CU on AMD) from warps (wavefronts) and a rough register estimate
  of the tile (the static report's register counts are the truth; this only has to rank plans).

It ranks the planner's candidates (gn_triton._tuning) and predicts what `python -m gn_triton.explain`
prints. Device figures: SMs and L2 from the device (from the spec sheet for a modelled device);
copy bandwidth and launch cost from DEVICES (defaults, each entry says which) until a GPU run's
results (perf/results/<gpu>/) calibrate them. ROCm builds of torch (torch.version.hip) drive AMD
GPUs through the same torch.cuda API: the device's architecture (gcnArchName) picks its AMD entry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ._launches import plan_launches

SECTOR_BYTES = 32
PROGRAMS_PER_SM_TO_SATURATE = 2  # a launch needs about this many programs per SM to keep HBM busy
L2_OVER_HBM = 2.5  # L2 read bandwidth over HBM copy bandwidth (H100/H200: roughly 2-3x)
# AMD Instinct MI300X/MI325X/MI355X: the L2 is 4 MB per XCD (8 XCDs), private to the XCD's CUs, and
# consecutive programs of a launch go to different XCDs, so a split plan's apply program rarely finds
# its block in the L2 that read it first. The 256 MB Infinity Cache (MALL) sits in front of HBM and is
# shared by all XCDs: it is the level that serves second reads. Its read bandwidth over the HBM copy
# bandwidth is a default below the spec sheet's peak ratio (17.2 TB/s over 5.3 TB/s on MI300X: 3.2x).
MALL_OVER_HBM = 2.0


# The host's cost of a call, measured by perf/host_report.py (perf/results/host/, docs/host-path.md):
# triton's real launch path with a stand-in driver on the 2-core development machine, triton 3.6.0,
# a cached launch program per call: about MEASURED_CALL_US per call besides its launches and
# MEASURED_LAUNCH_US per launch through a compiled kernel's own entry. A GPU server's CPU runs that
# Python about GPU_HOST_SPEEDUP times as fast (an assumption), and each launch also costs the driver's
# cuLaunchKernel, which the stand-in driver does not run (DRIVER_LAUNCH_US, a default). A GPU run's
# eager-loop timings (perf/evidence/env.py, host_path) measure the truth.
MEASURED_CALL_US = 10.0
MEASURED_LAUNCH_US = 1.1
GPU_HOST_SPEEDUP = 2.0
DRIVER_LAUNCH_US = 2.0
HOST_CALL_US = MEASURED_CALL_US / GPU_HOST_SPEEDUP
HOST_LAUNCH_US = MEASURED_LAUNCH_US / GPU_HOST_SPEEDUP + DRIVER_LAUNCH_US
_HOST_SOURCE = (f"host {HOST_CALL_US:.1f} us per call + {HOST_LAUNCH_US:.1f} us per launch: measured without a GPU "
                f"(perf/host_report.py), halved for a GPU server's CPU, plus {DRIVER_LAUNCH_US:.0f} us of driver "
                f"per launch (defaults)")  # fmt: skip


@dataclass(frozen=True)
class DeviceModel:
    name: str
    sms: int
    l2_bytes: int
    copy_gbps: float  # device-to-device copy: (read + write) bytes per second / 1e9
    launch_us: float = HOST_LAUNCH_US  # host time of one kernel launch (compiled entry and driver)
    source: str = ""  # where the copy bandwidth and launch cost come from
    vendor: str = "nvidia"  # "amd": sms counts compute units (CUs), warps are wavefronts
    arch: str = ""  # AMD: the gcnArchName prefix (gfx942) that picks this entry for an unnamed device
    warp_size: int = 32  # threads per warp (64 per wavefront on AMD Instinct)
    max_warps_per_sm: int = 64  # resident warps per SM (AMD: 4 SIMDs x 8 wavefronts per CU)
    registers_per_sm: int = 65536  # 32-bit registers per SM (AMD: 4 SIMDs x 512 VGPRs x 64 lanes)
    mall_bytes: int = 0  # AMD Infinity Cache (memory-attached last level), shared by all XCDs
    cache_over_hbm: float = L2_OVER_HBM  # read bandwidth of the second-read cache over copy bandwidth
    call_us: float = HOST_CALL_US  # host time of a call besides its launches (checks, lookup, allocation)

    @property
    def cache_bytes(self) -> int:
        """The cache that serves a plan's second read: the L2, or the Infinity Cache where there is one
        (an AMD L2 is per XCD; see MALL_OVER_HBM)."""
        return self.mall_bytes or self.l2_bytes

    @property
    def l2_budget(self) -> int:
        """Bytes a plan may hold in the last-level cache (cache_bytes) between its two reads of the
        same data."""
        return self.cache_bytes // 2


# SMs and L2 from the spec sheets; copy bandwidth a default of about 90% of the spec sheet's HBM
# bandwidth (what a device-to-device copy reaches in practice); launch cost a default. A GPU run of
# the evidence job measures both (perf/README.md): its figures replace these.
DEVICES = {
    "h100": DeviceModel("NVIDIA H100 80GB HBM3", 132, 50 << 20, 3000.0, HOST_LAUNCH_US,
                        "copy bandwidth a default, 90% of the spec sheet's 3.35 TB/s; " + _HOST_SOURCE),
    "h200": DeviceModel("NVIDIA H200", 132, 60 << 20, 4300.0, HOST_LAUNCH_US,
                        "copy bandwidth a default, 90% of the spec sheet's 4.8 TB/s; " + _HOST_SOURCE),
    "a100": DeviceModel("NVIDIA A100-SXM4-80GB", 108, 40 << 20, 1700.0, HOST_LAUNCH_US,
                        "copy bandwidth a default, 83% of the spec sheet's 2.04 TB/s; " + _HOST_SOURCE),
    **{key: DeviceModel(name, cus, 4 << 20, 0.8 * tbps * 1000, HOST_LAUNCH_US,
                        f"CUs, L2 (4 MB per XCD) and Infinity Cache from AMD's spec sheet; copy bandwidth a default, "
                        f"80% of the spec sheet's {tbps} TB/s; {_HOST_SOURCE}; not calibrated on the GPU",
                        vendor="amd", arch=arch, warp_size=64, max_warps_per_sm=32, registers_per_sm=4 * 512 * 64,
                        mall_bytes=256 << 20, cache_over_hbm=MALL_OVER_HBM)
       for key, name, arch, cus, tbps in (("mi300x", "AMD Instinct MI300X", "gfx942", 304, 5.3),
                                          ("mi325x", "AMD Instinct MI325X", "gfx942", 304, 6.0),
                                          ("mi355x", "AMD Instinct MI355X", "gfx950", 256, 8.0))},
}  # fmt: skip


def _key(name: str) -> str:
    """The DEVICES key found in a device's name ("" if none)."""
    return next((key for key in DEVICES if key in name.lower()), "")


def _arch_key(name: str) -> str:
    """The first AMD entry whose architecture is in the name (a ROCm device's name carries its
    gcnArchName, see _cuda_name), "" if none."""
    return next((key for key, model in DEVICES.items() if model.arch and model.arch in name.lower()), "")


def known_device(name: str) -> DeviceModel:
    """The DEVICES entry whose key is in the device's name, else the first of its AMD architecture (an
    MI350X, an MI300A), else an H100."""
    return DEVICES[_key(name) or _arch_key(name) or "h100"]


def is_rocm() -> bool:
    """Whether torch is a ROCm build: torch.cuda then drives AMD GPUs."""
    return getattr(torch.version, "hip", None) is not None


@functools.cache
def _cuda_name(device: torch.device) -> str:
    """The device's name; on ROCm followed by its architecture, e.g. "AMD Instinct MI300X (gfx942:sramecc+:xnack-)"
    (the marketing name is generic or empty on some ROCm versions; the architecture is always there)."""
    if not torch.cuda.is_available():
        return "unknown"
    name = torch.cuda.get_device_name(device)
    if is_rocm():
        name = f"{name} ({torch.cuda.get_device_properties(device).gcnArchName})"
    return name


def device_model(device: torch.device, sms: int, l2_bytes: int) -> DeviceModel:
    """The model of a CUDA or ROCm device: its own SM (CU) count and L2, the table's bandwidth, launch
    cost, warp size and Infinity Cache."""
    name = _cuda_name(device)
    known = known_device(name)
    if is_rocm() and known.vendor != "amd":  # an AMD GPU the table does not know: a wavefront-64 model
        known = DEVICES["mi300x"]
    source = known.source if _key(name) else f"{name} is not in the table: the {known.name}'s figures"
    return dataclasses.replace(known, name=name, sms=sms, l2_bytes=l2_bytes,
                               source=f"SMs and L2 from the device; {source}")  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    """What the model expects of one call: bytes, launches, programs and time (labelled a model
    wherever it is shown)."""

    floor_bytes: int
    hbm_bytes: float
    launches: int
    programs: int  # per launch (the largest launch)
    waves: int  # split path: waves of blocks (1 for fused)
    gpu_us: float
    host_us: float  # the call's host path: Python, allocation, launches

    @property
    def host_bound(self) -> bool:
        """Whether the GPU waits for the host: the call's host path outlasts its GPU work."""
        return self.host_us > self.gpu_us

    @property
    def time_us(self) -> float:
        return max(self.gpu_us, self.host_us)

    @property
    def traffic_over_floor(self) -> float:
        return self.hbm_bytes / self.floor_bytes

    def pct_copy_bw(self, device: DeviceModel) -> float:
        """The floor bytes' throughput as % of the copy bandwidth (the sweep's figure of merit)."""
        return 100 * self.floor_bytes / (self.time_us * 1e-6) / (device.copy_gbps * 1e9)


def tensors_read(direction: str) -> int:
    return 1 if direction == "fwd" else 2  # forward reads x; backward reads x and dy


# Activation-sized transfers no implementation can avoid: forward x, y; backward x, dy, dx; both.
FLOOR_TRANSFERS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def floor_bytes(mode: str, numel: int, elem_size: int, out_elem_size: int | None = None) -> int:
    """The floor bytes of a call: every activation-sized tensor read once and written once. y (and dy)
    are out_elem_size bytes an element where the output's dtype is wider than x's (fp32 from 16-bit
    input under CUDA autocast): forward x + y, backward x + dy + dx."""
    extra = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * ((out_elem_size or elem_size) - elem_size)
    return numel * (elem_size * FLOOR_TRANSFERS[mode] + extra)


def programs_per_sm(block_c: int, block_s: int, num_warps: int, device: DeviceModel | None = None) -> int:
    """Resident programs per SM (CU): at most the device's resident warps, and a rough register count
    of the tile (about four registers per tile element a thread holds, plus 40) against its register
    file. An NVIDIA SM by default."""
    warp_size, max_warps, registers_per_sm = (
        (device.warp_size, device.max_warps_per_sm, device.registers_per_sm) if device else (32, 64, 65536)
    )
    threads = warp_size * num_warps
    registers = min(255, 40 + 4 * math.ceil(block_c * block_s / threads))
    return max(1, min(max_warps // num_warps, registers_per_sm // (threads * registers), 32))


def predict(direction: str, p, plan, device: DeviceModel) -> Prediction:
    """The model's cost of running `plan` (a gn_triton._plan.Plan) on problem `p`."""
    plan = plan.fit(p)
    reads = tensors_read(direction)
    tensor = p.N * p.C * p.S * p.elem_size
    floor = floor_bytes(direction, p.N * p.C * p.S, p.elem_size, p.out_elem_size)
    groups = min(plan.groups_per_program, p.G)
    sector_waste = 1.0
    if p.channels_last:
        slice_bytes = min(groups * p.Cg, p.C) * p.elem_size
        sector_waste = math.ceil(slice_bytes / SECTOR_BYTES) * SECTOR_BYTES / slice_bytes
    block_read = groups * p.row_elems * p.elem_size * reads
    blocks = plan.blocks(p)
    budget = device.l2_budget
    if plan.split == 1:
        resident = min(blocks, device.sms * programs_per_sm(plan.block_c, plan.block_s, plan.num_warps, device))
        miss = max(0.0, 1 - budget / (resident * block_read))
        second = miss * tensor * reads
        programs, waves = blocks, 1
    else:
        spans = plan.span(p.S)[1] * plan.chunk(p)[1]  # (span, chunk) pieces per block
        counts = [count for _, count in plan.waves(p)]
        second = sum(max(0.0, 1 - budget / (c * block_read)) * c * block_read for c in counts)
        programs, waves = max(counts) * spans, len(counts)
    launches = len(plan_launches(direction, p, plan))
    hbm = (floor + second) * sector_waste
    from_l2 = (tensor * reads - second) * sector_waste
    saturation = min(1.0, programs / (PROGRAMS_PER_SM_TO_SATURATE * device.sms))
    gpu_us = (hbm + from_l2 / device.cache_over_hbm) / (device.copy_gbps * 1e3 * saturation)
    return Prediction(floor, hbm, launches, programs, waves, gpu_us, device.call_us + launches * device.launch_us)
