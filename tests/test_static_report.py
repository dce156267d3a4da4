"""Ahead-of-time compilation for sm_80 and sm_90, no GPU needed: every kernel compiles, none spills,
and the NCHW main loops of aligned 16-bit and 32-bit inputs use 128-bit global loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation
    proc = subprocess.run(
        [sys.executable, "-m", "perf.static_report", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    kernels = {r["kernel"] for r in report}
    assert len(kernels) == 8, kernels
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in report if r["arch"] == arch} == kernels
    assert not [r for r in report if "error" in r]


def test_int64_offsets_fp64_and_activations_compile(report):
    """Tensors over 2^31 elements (INDEX_64) cannot run here, and fp64 and the fused activations use
    math the interpreter does in numpy: their kernels must compile."""
    assert len({r["kernel"] for r in report if r.get("INDEX_64")}) >= 4
    assert len({r["kernel"] for r in report if r["dtype"] == "fp64"}) >= 4
    assert {r.get("ACTIVATION") for r in report} >= {0, 1, 2, 3}


def test_no_register_spills(report):
    assert [r for r in report if r["spill_bytes"]] == []


def test_128_bit_loads_on_aligned_nchw(report):
    rows = [
        r for r in report
        if r["aligned"] and not r["channels_last"] and "BLOCK_S" in r
        and r["BLOCK_S"] * {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}[r["dtype"]] >= 128
    ]  # fmt: skip
    assert rows
    assert [(r["kernel"], r["dtype"], r["arch"]) for r in rows if r["widest_load_bits"] != 128] == []
