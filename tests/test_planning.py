"""The planner on the CPU: the cost model's properties, the plans it picks for every suite shape on a
modelled H100, the bounded autotuner, the persistent plan cache, `explain`, and failure handling."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gn_triton import _cost, _plan_cache, _tuning
from gn_triton._plan import MAX_TENSOR_NUMEL, merge_step
from gn_triton._tuning import Plan, Problem
from perf.suites import BATCHES, SUITES

ROOT = Path(__file__).resolve().parents[1]
H100 = _cost.DEVICES["h100"]


def suite_problems(dtypes=(torch.bfloat16, torch.float16, torch.float32), batches=BATCHES, suites=tuple(SUITES)):
    for suite in suites:
        for shape in SUITES[suite]:
            for N in batches:
                for dtype in dtypes:
                    for channels_last in (False, True) if len(shape.spatial) >= 2 else (False,):
                        for direction in ("fwd", "bwd"):
                            S = math.prod(shape.spatial)
                            yield direction, Problem(N, shape.C, S, shape.G, dtype, channels_last, True, True)


def with_l2(device, l2_bytes):
    return _cost.DeviceModel(device.name, device.sms, l2_bytes, device.copy_gbps, device.launch_us)


# --- the model --------------------------------------------------------------------------------


def test_more_l2_never_predicts_more_bytes():
    for direction, p in list(suite_problems(dtypes=(torch.bfloat16,), batches=(1, 8, 32)))[::3]:
        for plan in _tuning.plan_space(direction, p, H100)[::7]:
            bytes_by_l2 = [_cost.predict(direction, p, plan, with_l2(H100, mib << 20)).hbm_bytes
                           for mib in (4, 16, 40, 50, 60, 256)]  # fmt: skip
            assert bytes_by_l2 == sorted(bytes_by_l2, reverse=True), (direction, p, plan)


def test_waves_that_fit_l2_predict_the_floor_and_oversized_fused_blocks_the_extra_read():
    p = Problem(32, 128, 512 * 512, 32, torch.bfloat16, False, True, True)  # 2.1 GB: far larger than L2
    for direction, reads in (("fwd", 1), ("bwd", 2)):
        wave = _tuning._wave_blocks(direction, p, 1, H100.l2_budget)
        split = _cost.predict(direction, p, Plan(split=8, block_c=1, block_s=2048, wave_blocks=wave), H100)
        assert split.traffic_over_floor == pytest.approx(1.0)
        assert split.launches == 2 * math.ceil(p.blocks(1) / wave) + (direction == "bwd")
        fused = _cost.predict(direction, p, Plan(split=1, block_c=1, block_s=2048), H100)
        # resident blocks of 2-4 MB each, hundreds of them: nearly every second read comes from HBM
        assert fused.traffic_over_floor > 1 + 0.9 * reads / (reads + 1)


def test_narrow_channels_last_slices_pay_whole_sectors():
    p = Problem(1, 128, 64 * 64, 32, torch.bfloat16, True, True, True)  # 4 channels = 8 bytes per group
    one_group = _cost.predict("fwd", p, Plan(split=4, groups_per_program=1, block_c=4, block_s=256), H100)
    four_groups = _cost.predict("fwd", p, Plan(split=4, groups_per_program=4, block_c=16, block_s=256), H100)
    assert one_group.hbm_bytes == pytest.approx(4 * four_groups.hbm_bytes)


# --- the plans it picks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chosen():
    return [(d, p, *_tuning.ranked_plans(d, p, H100)[0]) for d, p in suite_problems()]


def test_extra_traffic_is_only_ever_traded_for_fewer_launches(chosen):
    """Every suite shape, batch 1-64, 16/32-bit, both layouts, on a modelled H100: a plan above 1.1x the
    floor bytes is chosen only where every plan at the floor issues more launches or runs fewer
    programs per launch (small tensors, where launches and idle SMs cost more than the bytes), or
    where no plan reaches the floor (no block fits the L2 budget)."""
    over = 0
    for direction, p, plan, pred in chosen:
        if pred.traffic_over_floor <= 1.1:
            continue
        over += 1
        space = [_cost.predict(direction, p, q, H100) for q in _tuning.plan_space(direction, p, H100)]
        at_floor = [q for q in space if q.traffic_over_floor <= 1.1]
        assert all(q.launches > pred.launches or q.programs < pred.programs for q in at_floor), (p, plan, pred)
    assert over < len(chosen) // 5


def test_large_tensors_fill_the_gpu_and_launches_stay_bounded(chosen):
    """Tensors of 32 MiB or more run at least two programs per SM in every launch (below that, one
    launch of 256 programs can beat two launches of more). Launches: at most 3 when the data read fits
    the L2 budget, else one pair per L2-sized wave plus one; a wave holds whole blocks, so it is at
    least half the budget."""
    for direction, p, plan, pred in chosen:
        tensor = p.N * p.C * p.S * p.elem_size
        if tensor >= 32 << 20:
            assert pred.programs >= 2 * H100.sms, (direction, p, plan, pred)
        read = tensor * _cost.tensors_read(direction)
        bound = 3 if read <= H100.l2_budget else 2 * math.ceil(2 * read / H100.l2_budget) + 1
        assert pred.launches <= bound, (direction, p, plan, pred)


def test_batch1_splits_and_large_batches_fuse():
    p1 = Problem(1, 320, 64 * 64, 32, torch.float16, False, True, True)
    p64 = Problem(64, 320, 64 * 64, 32, torch.float16, False, True, True)
    for direction in ("fwd", "bwd"):
        plan = _tuning.heuristic_plan(direction, p1, H100)
        assert plan.split > 1 and plan.blocks(p1) * plan.span(p1.S)[1] * plan.chunk(p1)[1] >= 2 * H100.sms
    assert _tuning.heuristic_plan("fwd", p64, H100).split == 1


def test_nchw_tiles_leave_few_lanes_masked():
    """Every heuristic bf16 NCHW plan of the suites with aligned rows: at least 95% of its tiles' lanes
    hold data (Plan.valid_share; perf.static_report --loops counts a masked lane's instructions per
    valid element), in tiles of 512 elements or more. Groups of 10 channels (C320) at batch 1-4 run
    on the split path in channel chunks, with no lane masked."""
    for direction, p in suite_problems(dtypes=(torch.bfloat16,)):
        if p.channels_last or p.C % 16 or p.S % 16:
            continue
        plan = _tuning.heuristic_plan(direction, p, H100)
        assert plan.valid_share(p) >= 0.95 and plan.block_c * plan.block_s >= 512, (direction, p, plan)
        if p.Cg == 10 and p.N <= 4:
            assert plan.split > 1 and plan.chunks > 1 and plan.valid_share(p) == 1.0, (direction, p, plan)


def kernel_variants(direction, p, plan):
    """Distinct compilations a plan triggers, as Triton specialises them: constexprs and warps, and
    each integer argument by ==1 and divisibility by 16 (a wave's first block included)."""
    plan = plan.fit(p)
    spec = lambda v: (v == 1, v % 16 == 0)
    base = (direction, p.dtype, p.channels_last, plan.groups_per_program, plan.block_c, plan.block_s,
            plan.num_warps, spec(p.C), spec(p.S), spec(p.Cg),
            p.channel_multiple(plan.groups_per_program) if p.channels_last else 1)  # fmt: skip
    if plan.split == 1:
        return {("fused", *base)}
    span, split = plan.span(p.S)
    chunks = plan.chunk(p)[1]  # the forward's SPANS counts (chunk, span) pieces
    return {("split", *base, plan.chunk_constexpr(p), spec(offset), spec(span), spec(split), spec(split * chunks))
            for offset, _ in plan.waves(p)}  # fmt: skip


def test_default_sweep_compiles_a_bounded_number_of_variants(monkeypatch):
    """perf.sweep's default (SD U-Net and VAE, batch 1-32, bf16, both layouts) with the autotuner on
    compiled 831 kernel pairs when it timed every candidate; the model's few candidates need 182."""
    monkeypatch.setattr(_tuning, "device_info", lambda device: (H100.sms, H100.l2_bytes))
    cuda = torch.device("cuda")
    keys, variants = set(), set()
    batches = [b for b in BATCHES if b <= 32]
    for direction, p in suite_problems((torch.bfloat16,), batches, suites=("sd_unet", "sd_vae")):
        key = _tuning._bucket_key(direction, p, cuda, ())
        if key not in keys:
            keys.add(key)
            for plan in _tuning.candidate_plans(direction, p, cuda):
                variants |= kernel_variants(direction, p, plan)
    assert len(keys) == 192
    assert len(variants) <= 250


def test_candidates_are_the_models_best_few(monkeypatch):
    p = Problem(1, 128, 512 * 512, 32, torch.bfloat16, True, True, True)
    ranked = [plan for plan, _ in _tuning.ranked_plans("bwd", p, H100)]
    candidates = _tuning.candidate_plans("bwd", p, H100)
    assert len(candidates) == 4 and candidates[0] == ranked[0] == _tuning.heuristic_plan("bwd", p, H100)
    assert all(plan in ranked for plan in candidates)
    monkeypatch.setenv("GN_TRITON_TUNE_CANDIDATES", "2")
    assert _tuning.candidate_plans("bwd", p, H100) == candidates[:2]
    monkeypatch.setenv("GN_TRITON_TUNE_CANDIDATES", "all")
    assert _tuning.candidate_plans("bwd", p, H100) == ranked


# --- the autotuner: failures, CUDA graphs, the disk cache ---------------------------------------


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """choose_plan on a pretend CUDA device with a modelled H100, a fresh cache folder, and do_bench
    replaced by a recorder (the first candidate timed wins unless a test says otherwise)."""
    monkeypatch.setattr(_tuning, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(_tuning, "device_info", lambda device: (H100.sms, H100.l2_bytes))
    monkeypatch.setattr(_tuning, "_tuned", {})
    monkeypatch.setattr(_plan_cache, "_loaded", {})
    monkeypatch.setenv("GN_TRITON_CACHE_DIR", str(tmp_path))
    timed = []

    def fake_bench(fn, **kwargs):
        fn()
        timed.append(fn)
        return float(len(timed))

    monkeypatch.setattr(_tuning.triton.testing, "do_bench", fake_bench)
    return timed


P = Problem(1, 320, 64 * 64, 32, torch.float16, False, True, True)
CUDA = torch.device("cuda")


def test_a_candidate_that_crashes_is_skipped_with_a_warning(tuner):
    candidates = _tuning.candidate_plans("fwd", P, CUDA)

    def launch(plan):
        if plan == candidates[0]:
            raise RuntimeError("PassManager::run failed")  # as triton 3.6 did on some fp32 tiles

    with pytest.warns(UserWarning, match="skipping candidate"):
        plan = _tuning.choose_plan("fwd", P, CUDA, launch)
    assert plan == candidates[1].fit(P)

    def always_fails(plan):
        raise RuntimeError("no GPU can run this")

    with pytest.raises(RuntimeError, match="no candidate plan could run"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tuning._fastest(candidates, always_fails)


def test_graph_capture_uses_a_tuned_plan_when_one_is_known(tuner, monkeypatch):
    monkeypatch.setattr(_tuning, "_capturing", lambda: True)
    launch = lambda plan: None
    assert _tuning.choose_plan("fwd", P, CUDA, launch) == _tuning.heuristic_plan("fwd", P, CUDA)
    assert tuner == []  # nothing is timed inside a capture
    tuned = Plan(split=3, block_c=2, block_s=512, num_warps=4)
    _tuning._tuned[_tuning._bucket_key("fwd", P, CUDA, ())] = tuned
    assert _tuning.choose_plan("fwd", P, CUDA, launch) == tuned.fit(P)


def test_tuned_plans_persist_and_are_reused_without_timing(tuner, monkeypatch, tmp_path):
    launch = lambda plan: None
    plan = _tuning.choose_plan("bwd", P, CUDA, launch, needs=(True, True, True, False, False))
    assert len(tuner) == len(_tuning.candidate_plans("bwd", P, CUDA))
    files = list(tmp_path.glob("plans-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 1
    # a new process: nothing in memory, the plan comes from disk, nothing is timed
    monkeypatch.setattr(_tuning, "_tuned", {})
    monkeypatch.setattr(_plan_cache, "_loaded", {})
    tuner.clear()
    assert _tuning.choose_plan("bwd", P, CUDA, launch, needs=(True, True, True, False, False)) == plan
    assert tuner == []


def test_a_corrupt_or_invalid_cache_is_ignored_then_replaced(tuner, tmp_path):
    path = _plan_cache.cache_file(CUDA)
    path.write_text('{"half a file')
    with pytest.warns(UserWarning, match="unreadable plan cache"):
        plan = _tuning.choose_plan("fwd", P, CUDA, lambda plan: None)
    assert plan == _tuning.candidate_plans("fwd", P, CUDA)[0].fit(P)  # tuned afresh
    entries = json.loads(path.read_text())
    assert len(entries) == 1
    # an entry that is not a plan is not used
    key = next(iter(entries))
    path.write_text(json.dumps({key: {"split": "x"}}))
    _plan_cache._loaded.clear()
    _tuning._tuned.clear()
    tuner.clear()
    _tuning.choose_plan("fwd", P, CUDA, lambda plan: None)
    assert tuner  # timed again


STORE = """
import sys
from gn_triton import _plan_cache
import torch
for i in range(25):
    _plan_cache.store(torch.device("cuda"), f"{sys.argv[1]}-{i}", {"split": i})
print(len(_plan_cache._read(_plan_cache.cache_file(torch.device("cuda")))))
"""


def test_the_cache_is_shared_by_concurrent_processes(tmp_path):
    env = dict(os.environ, GN_TRITON_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", STORE, name], env=env, stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]  # fmt: skip
    assert all(proc.wait(timeout=120) == 0 for proc in procs)
    reader = subprocess.run([sys.executable, "-c", "from gn_triton import _plan_cache; import torch; "
                             "print(sorted(_plan_cache.load(torch.device('cuda'))))"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    keys = eval(reader.stdout)
    assert keys == sorted(f"{n}-{i}" for n in "ab" for i in range(25))


# --- explain ------------------------------------------------------------------------------------


def test_explain_prints_the_plan_and_the_models_prediction():
    cmd = [
        sys.executable,
        "-m",
        "gn_triton.explain",
        "2x128x512x512:32",
        "--layout",
        "channels_last",
        "--device",
        "h200",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "PREDICTED BY gn_triton's COST MODEL" in out and "NVIDIA H200" in out
    for text in ("forward:", "backward:", "launches per call", "MB floor", "% of the 4300 GB/s copy bandwidth"):
        assert text in out, text
    bad = subprocess.run([sys.executable, "-m", "gn_triton.explain", "2x100x8x8:32"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "C=100 is not divisible by num_groups=32" in bad.stderr


# --- Triton's tensor-size cap -------------------------------------------------------------------


def block_tensors(plan: Plan, p: Problem) -> dict[str, int]:
    """Elements of each block tensor the kernels build under `plan` (kernels/_tile.py)."""
    R, spans = plan.groups_per_program, plan.span(p.S)[1]
    return {
        "[R, BLOCK_C] membership": R * plan.block_c,
        "[BLOCK_C, BLOCK_S] tile": plan.block_c * plan.block_s,
        "[R, BLOCK_SPANS] merge": R * merge_step(spans),
    }


@st.composite
def problems(draw):
    G = draw(st.sampled_from([1, 2, 3, 32, 320, 2048, 4096, 8192]))
    Cg = draw(st.sampled_from([1, 2, 3, 16, 64]))
    S = draw(st.integers(1, 1 << 20))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float64]))
    return Problem(draw(st.integers(1, 64)), G * Cg, S, G, dtype, draw(st.booleans()), True, True)


def assert_within_cap(plan, p):
    for name, numel in block_tensors(plan, p).items():
        assert numel <= MAX_TENSOR_NUMEL, (name, numel, plan, p)


@settings(max_examples=40, deadline=None)
@given(p=problems(), direction=st.sampled_from(["fwd", "bwd"]))
@example(p=Problem(1, 2048, 2, 2048, torch.float32, False, True, True), direction="fwd")
@example(p=Problem(1, 2048, 2, 2048, torch.bfloat16, True, True, True), direction="bwd")
@example(p=Problem(2, 8192, 1, 8192, torch.float32, False, True, True), direction="fwd")
def test_every_plan_respects_tritons_tensor_cap(p, direction):
    """Every plan of the GPU plan space (so every candidate the autotuner may time) and the
    interpreter's plan keeps each block tensor within Triton's 2^20 elements."""
    for plan in _tuning.plan_space(direction, p, H100):
        assert_within_cap(plan, p)
    assert_within_cap(_tuning.heuristic_plan(direction, p, torch.device("cpu")), p)


@settings(max_examples=60, deadline=None)
@given(
    p=problems(),
    fields=st.fixed_dictionaries(
        {name: st.sampled_from([1 << k for k in range(0, 15)]) for name in ("groups_per_program", "block_c", "block_s")}
    ),
    split=st.integers(1, 64),
)
def test_forced_and_cached_plans_are_fitted_within_the_cap(p, fields, split):
    """Plan.fit, which every plan passes before a launch (forced, cached or tuned), keeps the cap."""
    assert_within_cap(Plan(split=split, **fields).fit(p), p)


def test_fp32_output_of_16_bit_input_costs_its_bytes():
    """Under CUDA autocast y (and so dy) is fp32 for 16-bit x: the floor counts 2 + 4 bytes an element
    forward, 2 + 4 + 2 backward (a model)."""
    assert _cost.floor_bytes("fwd", 10, 2, 4) == 60 and _cost.floor_bytes("bwd", 10, 2, 4) == 80
    assert _cost.floor_bytes("fwd+bwd", 10, 2, 4) == 140 and _cost.floor_bytes("fwd", 10, 2) == 40
    p = Problem(8, 320, 4096, 32, torch.bfloat16, False, True, True)
    widened = Problem(8, 320, 4096, 32, torch.bfloat16, False, True, True, out_dtype=torch.float32)
    for direction, ratio in (("fwd", 6 / 4), ("bwd", 8 / 6)):
        plan = _tuning.heuristic_plan(direction, p, H100)
        assert (
            _cost.predict(direction, widened, plan, H100).floor_bytes
            == ratio * _cost.predict(direction, p, plan, H100).floor_bytes
        )
