"""The host-path benchmark (perf/host_report.py) runs end to end, as a smoke test: every route and
reference row, CPU times that are positive, and each call's launches as its plan for an H100 says.
Its figures are the benchmark's business (docs/host-path.md), never asserted here."""

import json

from gn_testing import python_without_interpreter


def test_host_report_measures_every_route(tmp_path):
    run = python_without_interpreter("-m", "perf.host_report", "--repeats", "1", "--calls", "2", "--out",
                                     str(tmp_path), timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = tmp_path.glob("host_triton*.json")
    report = json.loads(path.read_text())
    assert {"L", "T", "compiled entry", "autograd.Function floor of a step"} <= set(report["references_us"])
    rows = report["rows"]
    routes = {row["route"] for row in rows}
    assert {"group_norm, no grad", "GroupNorm module, no grad", "F.group_norm, eager override",
            "custom op (a compiled graph's call)", "training step (fwd + autograd.grad)"} <= routes  # fmt: skip
    assert all(row["host_us"] > 0 and row["launches"] >= 1 for row in rows)
    launches = {(row["route"], row["shape"]): row["launches"] for row in rows}
    assert launches["group_norm, no grad", "SD U-Net 1x1280x8x8"] == 1  # fused, one launch
    assert launches["training step (fwd + autograd.grad)", "SD U-Net 1x1280x8x8"] == 3  # + backward and dparams
    assert launches["group_norm, no grad", "SD VAE 32x512x128x128"] > 2  # split in L2-sized waves


def test_docs_table_is_the_committed_reports():
    """docs/host-path.md's table is what `--table` makes of the committed reports (regenerate it with
    the command the page gives when a report changes)."""
    from gn_testing import ROOT

    results = "perf/results/host"
    run = python_without_interpreter("-m", "perf.host_report", "--table", f"{results}/host_triton3.6.0.json",
                                     f"{results}/host_triton3.9.0.json", "--before",
                                     f"{results}/before/host_triton3.6.0.json", timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    text = (ROOT / "docs" / "host-path.md").read_text()
    shown = text.split("<!-- host-table:start -->\n")[1].split("<!-- host-table:end -->")[0]
    assert shown.strip() == run.stdout.strip()
