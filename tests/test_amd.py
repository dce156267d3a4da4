"""AMD Instinct without an AMD GPU: the MI300X/MI325X/MI355X device models, plans that fit a 64-wide
wavefront, ROCm device detection, `explain --device mi300x`, and ahead-of-time compilation of every
kernel for gfx942 and gfx950 at its largest tile, with no scratch (spills)."""

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from gn_testing import python_without_interpreter

from gn_triton import _cost, _tuning, explain
from gn_triton._tuning import Problem
from perf import amd_report
from perf.suites import SUITES

ROOT = Path(__file__).resolve().parents[1]
AMD = {key: model for key, model in _cost.DEVICES.items() if model.vendor == "amd"}


def amd_problems(batches=(1, 32), dtypes=(torch.bfloat16, torch.float32)):
    for suite in ("sd_unet", "sd_vae", "resnet50_gn", "mask_rcnn_head"):
        for shape in SUITES[suite][::2]:
            for N in batches:
                for dtype in dtypes:
                    for channels_last in (False, True):
                        for direction in ("fwd", "bwd"):
                            S = math.prod(shape.spatial)
                            yield direction, Problem(N, shape.C, S, shape.G, dtype, channels_last, True, True)


def test_amd_models_say_where_their_figures_come_from():
    assert set(AMD) == {"mi300x", "mi325x", "mi355x"}
    assert (AMD["mi300x"].sms, AMD["mi325x"].sms, AMD["mi355x"].sms) == (304, 304, 256)
    assert (AMD["mi300x"].arch, AMD["mi325x"].arch, AMD["mi355x"].arch) == ("gfx942", "gfx942", "gfx950")
    for model in AMD.values():
        assert model.warp_size == 64 and model.mall_bytes == 256 << 20 and model.l2_bytes == 4 << 20
        assert "spec sheet" in model.source and "not calibrated" in model.source
        # Second reads are budgeted against the shared Infinity Cache, not one XCD's 4 MB L2.
        assert model.cache_bytes == model.mall_bytes and model.l2_budget == 128 << 20
    assert AMD["mi300x"].copy_gbps < AMD["mi325x"].copy_gbps < AMD["mi355x"].copy_gbps
    assert _cost.DEVICES["h100"].cache_bytes == _cost.DEVICES["h100"].l2_bytes  # NVIDIA: the L2


@pytest.mark.parametrize("key", ["mi300x", "mi325x", "mi355x"])
def test_every_plan_fits_a_64_wide_wavefront_and_the_device(key):
    dev = AMD[key]
    for direction, p in amd_problems():
        per_lane = 16 // p.elem_size  # elements of a 128-bit load
        for plan in _tuning.plan_space(direction, p, dev):
            lanes, tile = 64 * plan.num_warps, plan.block_c * plan.block_s
            assert tile % lanes == 0 or plan.num_warps == 1, (p, plan)
            assert tile >= lanes * per_lane or plan.num_warps == 1, (p, plan)  # 128-bit loads for every lane
            assert lanes <= 1024 and plan.num_warps <= 8, (p, plan)  # a workgroup holds at most 1024 threads
            assert 1 <= _cost.programs_per_sm(plan.block_c, plan.block_s, plan.num_warps, dev)
        plan, pred = _tuning.ranked_plans(direction, p, dev)[0]
        assert pred.traffic_over_floor >= 1 and 0 < pred.pct_copy_bw(dev) <= 100, (p, plan, pred)
        assert plan.fit(p) == plan and plan.split * plan.blocks(p) >= 1


def test_a_wavefront_holds_the_threads_of_two_warps():
    """Same threads per program as the NVIDIA plan, so each lane keeps its elements and load width."""
    p = Problem(2, 320, 64 * 64, 32, torch.bfloat16, False, True, True)
    nvidia = _tuning.heuristic_plan("fwd", p, _cost.DEVICES["h100"])
    assert (nvidia.block_c * nvidia.block_s, nvidia.num_warps) == (4096, 8)
    assert _tuning._for_warp_size(nvidia, p, AMD["mi300x"]).num_warps == 4  # 256 lanes x 16 elements
    assert _tuning._for_warp_size(nvidia, p, _cost.DEVICES["h100"]) == nvidia
    small = _tuning.Plan(block_c=8, block_s=64, num_warps=4)  # 512 elements: one wavefront of 128-bit loads
    assert _tuning._for_warp_size(small, p, AMD["mi300x"]).num_warps == 1
    fp32 = dataclasses.replace(p, dtype=torch.float32)  # 4 elements per 128-bit load: two wavefronts
    assert _tuning._for_warp_size(small, fp32, AMD["mi300x"]).num_warps == 2
    assert {plan.num_warps for plan in _tuning.plan_space("fwd", p, AMD["mi300x"])} <= {1, 2, 4}


def test_data_that_fits_the_infinity_cache_is_read_once_from_hbm():
    """A 16 MB bf16 tensor is 4x one XCD's L2 but fits the 256 MB Infinity Cache: the cheapest plans'
    second reads come from the cache (the floor), while on a model with only the 4 MB L2 they do not."""
    p = Problem(1, 128, 256 * 256, 32, torch.bfloat16, False, True, True)
    mi300x = AMD["mi300x"]
    l2_only = _cost.DeviceModel("L2 only", 304, 4 << 20, mi300x.copy_gbps, 6.0, warp_size=64, max_warps_per_sm=32,
                                registers_per_sm=4 * 512 * 64)  # fmt: skip
    for direction in ("fwd", "bwd"):
        assert _tuning.ranked_plans(direction, p, mi300x)[0][1].traffic_over_floor == pytest.approx(1.0)
        fused = _tuning.Plan(split=1, block_c=1, block_s=4096, num_warps=4)
        with_mall, without = (_cost.predict(direction, p, fused, dev).hbm_bytes for dev in (mi300x, l2_only))
        assert without > with_mall == pytest.approx(_cost.floor_bytes(direction, 128 * 256 * 256, 2))


def test_residency_counts_wavefronts_and_the_cu_register_file():
    mi300x = AMD["mi300x"]
    assert _cost.programs_per_sm(1, 256, 1, mi300x) == 32  # 32 wavefronts per CU, few registers
    assert _cost.programs_per_sm(1, 1024, 4, mi300x) == 8  # 32 wavefronts / 4 (56 registers a lane)
    assert _cost.programs_per_sm(1, 4096, 4, mi300x) == 4  # 16 elements, ~104 registers a lane: the file limits
    assert _cost.programs_per_sm(1, 4096, 8) == _cost.programs_per_sm(1, 4096, 8, _cost.DEVICES["h100"])


@pytest.fixture
def rocm(monkeypatch):
    """torch as a ROCm build with one GPU of the given name and gcnArchName."""

    def use(name: str, arch: str):
        monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        props = types.SimpleNamespace(gcnArchName=arch, multi_processor_count=304, L2_cache_size=4 << 20)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        _cost._cuda_name.cache_clear()

    yield use
    _cost._cuda_name.cache_clear()


@pytest.mark.parametrize(
    "name, arch, key",
    [("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", "mi300x"), ("AMD Instinct MI325X", "gfx942", "mi325x"),
     ("AMD Instinct MI355X", "gfx950", "mi355x"), ("", "gfx950:sramecc+:xnack-", "mi355x"),
     ("AMD Instinct MI300A", "gfx942", "mi300x"), ("AMD Radeon", "gfx90a", "mi300x")],
)  # fmt: skip
def test_a_rocm_device_maps_to_its_amd_model(rocm, name, arch, key):
    rocm(name, arch)
    model = _cost.device_model(torch.device("cuda"), 228, 4 << 20)
    known = _cost.DEVICES[key]
    assert (model.vendor, model.warp_size, model.mall_bytes, model.copy_gbps) == (
        "amd", 64, known.mall_bytes, known.copy_gbps,
    )  # fmt: skip
    assert (model.sms, model.l2_bytes) == (228, 4 << 20)  # the device's own CUs and L2
    assert arch.split(":")[0] in model.name and "from the device" in model.source


def test_a_cuda_device_keeps_its_nvidia_model(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    _cost._cuda_name.cache_clear()
    try:
        model = _cost.device_model(torch.device("cuda"), 132, 60 << 20)
    finally:
        _cost._cuda_name.cache_clear()
    assert (model.vendor, model.warp_size, model.copy_gbps, model.cache_bytes) == ("nvidia", 32, 4300.0, 60 << 20)


@pytest.mark.parametrize("key", ["mi300x", "mi325x", "mi355x"])
def test_explain_plans_for_amd(key):
    text = explain.explain((1, 128, 512, 512), 32, "bf16", "contiguous", AMD[key])
    assert f"{AMD[key].sms} CUs, wavefront 64, 4 MiB L2 per XCD, 256 MiB Infinity Cache" in text
    assert "PREDICTED" in text and "not calibrated" in text
    for part in text.split("backward:"):
        warps = int(part.split("num_warps=")[1].split(",")[0])
        tile = int(part.split("block_c=")[1].split(",")[0]) * int(part.split("block_s=")[1].split(",")[0])
        assert tile % (64 * warps) == 0


def test_explain_command_line_for_mi300x():
    proc = subprocess.run([sys.executable, "-m", "gn_triton.explain", "1x128x512x512:32", "--dtype", "bf16",
                           "--device", "mi300x"], capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "AMD Instinct MI300X (304 CUs" in proc.stdout and "backward:" in proc.stdout


def test_amdgcn_load_widths():
    amdgcn = """
        s_load_dwordx2 s[2:3], s[0:1], 0x0
        global_load_dwordx4 v[2:5], v[2:3], off
        global_load_ushort v6, v[2:3], off
        global_load_short_d16_hi v6, v[2:3], off offset:2
        buffer_load_dwordx2 v[8:9], v1, s[4:7], 0 offen
        buffer_load_dword v10, v1, s[4:7], 0 offen
        s_buffer_load_dword s4, s[0:3], 0x0
        global_store_dwordx4 v[2:3], v[4:7], off
        ds_read_b128 v[4:7], v1
    """
    assert amd_report.load_widths(amdgcn) == [128, 16, 16, 64, 32]


# The compile check: every kernel at its largest tile in the AMD plan space (the tile a compiler is
# likeliest to reject or spill on), in bf16 and fp32, for both architectures.
_COMPILE = """
import json, sys
from perf import amd_report, static_report as sr
rows = []
for arch in ("gfx942", "gfx950"):
    largest = {}
    for spec in sr.all_specs(quick=True, device=amd_report.device_for(arch)):
        key = (spec.kernel, spec.dtype)
        if spec.dtype in ("bf16", "fp32") and (key not in largest or sr._tile_elems(spec) > sr._tile_elems(
                largest[key])):
            largest[key] = spec
    rows += [sr.compile_and_inspect(spec, arch) for spec in largest.values()]
json.dump(rows, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def amd_report_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("amd") / "rows.json"
    proc = python_without_interpreter("-c", _COMPILE, str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_gfx942_and_gfx950_without_scratch(amd_report_rows):
    from gn_triton import kernels as module

    every = {name for name in module.__all__ if name.endswith("_kernel")}
    for arch in ("gfx942", "gfx950"):
        for dtype in ("bf16", "fp32"):
            assert {r["kernel"] for r in amd_report_rows if (r["arch"], r["dtype"]) == (arch, dtype)} == every
    assert [r for r in amd_report_rows if "error" in r] == []
    assert [(r["kernel"], r["arch"], r["spill_bytes"]) for r in amd_report_rows if r["spill_bytes"]] == []
    assert all(0 < r["registers"] <= 512 and r["global_loads"] > 0 for r in amd_report_rows)
    assert [r["num_warps"] for r in amd_report_rows if r["num_warps"] > 4] == []  # wavefront-64 plans


def test_aligned_nchw_main_loops_load_128_bits_on_amd(amd_report_rows):
    rows = [r for r in amd_report_rows if r["aligned"] and not r["channels_last"] and r.get("BLOCK_S", 0) >= 64
            and r["kernel"] in ("_gn_fwd_fused_kernel", "_gn_fwd_partial_stats_kernel")]  # fmt: skip
    assert rows
    narrow = [(r["kernel"], r["dtype"], r["arch"], r["widest_load_bits"]) for r in rows if r["widest_load_bits"] < 128]
    assert narrow == []


def test_the_traffic_stage_on_rocm_is_skipped_with_its_reason(monkeypatch, tmp_path):
    from perf.evidence import job, traffic

    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    out = job.Job(tmp_path, 60, {})
    result = traffic.stage_traffic(out, job.Context(device="cuda", rehearse=False, rep_ms=1), job.Clock(1e12))
    assert result.startswith("skipped (ROCm: ncu is NVIDIA-only") and "rocprof" in result
    assert "skipped: ROCm" in (tmp_path / "traffic.csv").read_text()
