"""Ahead-of-time compilation for sm_80 and sm_90, no GPU needed: every kernel compiles, none spills,
and the NCHW main loops of aligned 16-bit and 32-bit inputs use 128-bit global loads. The suite runs
the installed triton; `make static-report TRITON_SPEC=triton==3.6.0` checks another one."""

import json

import pytest
from gn_testing import python_without_interpreter


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    proc = python_without_interpreter("-m", "perf.static_report", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    from gn_triton import kernels as module

    kernels = {r["kernel"] for r in report}
    assert kernels == {name for name in module.__all__ if name.endswith("_kernel")}
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in report if r["arch"] == arch} == kernels
    assert not [r for r in report if "error" in r]


def test_quick_covers_the_largest_tile_of_every_kernel_in_every_dtype(report):
    """Compilers reject or spill on the largest tiles first (triton 3.6 rejected fp32 fused-backward
    tiles of >= 256 elements, which a quick report of small tiles passed)."""
    from perf.static_report import _tile_elems, all_specs

    largest = {}
    for spec in all_specs(quick=False):
        key = (spec.kernel, spec.dtype)
        largest[key] = max(largest.get(key, (0, 0)), _tile_elems(spec))
    covered = {}
    for r in report:
        key = (r["kernel"], r["dtype"])
        elems = r.get("BLOCK_C", 1) * r.get("BLOCK_S", 1)
        covered[key] = max(covered.get(key, (0, 0)), (elems, elems // (32 * r["num_warps"])))
    assert {k[1] for k in largest} == {"fp16", "bf16", "fp32", "fp64"}
    assert covered == largest
    fused_bwd = {(r["NEEDS_DX"], r["NEEDS_PARTIALS"]) for r in report if r["kernel"] == "_gn_bwd_fused_kernel"}
    assert fused_bwd == {(True, True), (True, False), (False, True)}


def test_int64_offsets_fp64_and_activations_compile(report):
    """Tensors over 2^31 elements (INDEX_64) cannot run here, and fp64 and the fused activations use
    math the interpreter does in numpy: their kernels must compile."""
    assert len({r["kernel"] for r in report if r.get("INDEX_64")}) >= 4
    assert len({r["kernel"] for r in report if r["dtype"] == "fp64"}) >= 4
    assert {r.get("ACTIVATION") for r in report} >= {0, 1, 2, 3}


def test_no_register_spills(report):
    assert [r for r in report if r["spill_bytes"]] == []


def test_compare_names_each_variant_that_changed(report):
    from perf.static_report import compare

    assert compare(report, report) == []
    changed = [dict(r) for r in report]
    changed[3]["registers"] += 1
    del changed[5]
    differences = compare(report, changed)
    assert len(differences) == 2 and "registers" in " ".join(differences)
    assert sum(d.startswith("only in one report") for d in differences) == 1


def test_load_widths_of_every_global_load():
    from perf.static_report import load_widths

    sass = """
        /*0100*/                   LDG.E.U16 R4, desc[UR6][R2.64] ;
        /*0110*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR6][R2.64] ;
        /*0120*/                   LDG.E R5, desc[UR6][R6.64] ;
        /*0130*/                   LDG.E.64 R10, desc[UR6][R6.64] ;
        /*0140*/                   LDG.E.EL.S8 R10, desc[UR6][R6.64] ;
        /*0150*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR6][R6.64] ;
        /*0160*/                   STG.E.U16 desc[UR6][R2.64], R4 ;
        /*0170*/                   LDS.U16 R4, [R2] ;
    """
    assert load_widths(sass) == [16, 128, 32, 64, 8, 128]


def test_every_kernel_reports_its_loads(report):
    """Every kernel reads global memory: a row with no load means the SASS pattern missed one (it
    once missed LDG.E.U16, so unaligned 16-bit kernels showed none)."""
    assert [(r["kernel"], r["dtype"], r["arch"]) for r in report if not r["global_loads"]] == []


def test_128_bit_loads_on_aligned_nchw(report):
    rows = [
        r for r in report
        if r["aligned"] and not r["channels_last"] and "BLOCK_S" in r
        and r["BLOCK_S"] * {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}[r["dtype"]] >= 128
    ]  # fmt: skip
    assert rows
    assert [(r["kernel"], r["dtype"], r["arch"]) for r in rows if r["widest_load_bits"] != 128] == []


LOOP_CHECK = """
import json, torch
from gn_triton._plan import Plan, Problem
from perf import loop_report
p = Problem(1, 320, 64 * 64, 32, torch.bfloat16, False, True, True)
entries = [dict(direction=d, dtype="bf16", layout="nchw", plan=plan, aligned=True,
                valid_share=plan.valid_share(p), shapes=["1xC320 64x64 G32"], problem=p)
           for d in ("fwd", "bwd")
           for plan in (Plan(1, 1, 1, 4096, 8), Plan(4, 1, 2, 1024, 8), Plan(4, 1, 2, 1024, 4, chunks=5).fit(p))]
print(json.dumps(loop_report.run(jobs=2, entries=entries), default=str))
"""


def test_main_loops_are_lean():
    """A fused, a split and a channel-chunked split bf16 NCHW plan (sm_90, ahead of time): the statistics
    and gradient-sum loops accumulate per lane (no barrier or shuffle inside), and every loop stays
    within the issue budget's limits per valid element (perf/loop_report.py), with 128-bit loads and
    no spills."""
    from perf import loop_report

    proc = python_without_interpreter("-c", LOOP_CHECK, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert len(rows) == 6
    for row in rows:
        assert "error" not in row and row["masked"] == 0.0, row
        assert loop_report.violations(row) == [], row
        for kernel in row["kernels"].values():
            assert kernel["spill_bytes"] == 0 and kernel["widest_load_bits"] == 128, kernel
