"""The GPU benchmark job (perf/gpu_evidence.py) rehearsed on the CPU: stages in order, rows on disk
after a kill, the budget's clean stop, the output folder's rules, and ingest from partial results."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from gn_testing import python_without_interpreter

from perf import gpu_evidence, ingest
from perf.evidence import correctness, traffic

STAGE_NAMES = [s.name for s in gpu_evidence.STAGES]

rehearsal = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the rehearsal is the CPU mode")


def rehearse(out: Path, *extra: str, budget: float = 400) -> subprocess.CompletedProcess:
    """The rehearsal as a user starts it: without TRITON_INTERPRET (it sets it before gn_triton loads)."""
    return python_without_interpreter("-m", "perf.gpu_evidence", "--rehearse", "--out", str(out), "--budget-s",
                                      str(budget), *extra)  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    proc = rehearse(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@rehearsal
def test_stages_run_in_order_and_write_their_rows(full_run):
    run = json.loads((full_run / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == STAGE_NAMES
    assert all(s["status"] == "done" for s in run["stages"]), run["stages"]
    assert run["result"] == "all stages run"
    assert run["env"]["copy_gbps"] > 0 and run["env"]["gn_triton_call_us"] > 0
    host = run["env"]["host_path"]  # eager-loop times of gn_triton and torch, forward and training step
    assert {row["provider"] for row in host} == {"gn_triton", "torch"}
    assert all(row["eager_loop_us"] > 0 and row["step_eager_loop_us"] > 0 for row in host)
    log = (full_run / "log.txt").read_text()
    starts = [log.index(f"stage {k} {name}: start") for k, name in enumerate(STAGE_NAMES, 1)]
    assert starts == sorted(starts)
    checked = pd.read_csv(full_run / "correctness.csv")
    assert (checked["status"] == "ok").all(), checked[checked["status"] != "ok"]
    cases, _ = correctness.suite()  # the suite's own plans and epilogues
    assert {"heuristic", *cases.PATHS} <= set(checked["plan"])
    assert {"contiguous", "channels_last"} <= set(checked["layout"])
    assert {"scale+shift", "silu", "scale+gelu", "shift+gelu_tanh"} <= set(checked["epilogue"])
    assert "repeat" in set(checked["case"])
    sweep = pd.read_csv(full_run / "sweep.csv")
    assert set(sweep["stage"]) == {"core", "broad"}
    ok = sweep[sweep["status"] == "ok"]
    assert set(ok["provider"]) == {"gn_triton", "torch_eager"}
    assert (ok["check_error"] < ok["dtype"].map({"fp32": 1e-4, "bf16": 2e-2})).all()
    calibration = pd.read_csv(full_run / "calibration.csv")
    assert "heuristic" in set(calibration["role"]) and (calibration["status"] == "ok").all()
    assert "sanitize case" in (full_run / "sanitizer.txt").read_text()


@rehearsal
def test_output_folder_is_flat_and_within_its_file_limit(full_run, tmp_path):
    assert gpu_evidence.check_output_folder(full_run, 8) == []
    names = [p.name for p in full_run.iterdir()]
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert all(p.is_file() for p in full_run.iterdir())
    assert gpu_evidence.check_output_folder(full_run, 3) == [f"{len(names)} files (the limit is 3)"]


@rehearsal
def test_a_run_killed_after_stage_2_keeps_env_and_correctness_rows(tmp_path):
    proc = rehearse(tmp_path, "--kill-after-stage", "2")
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("env", "done"), ("correctness", "done")]
    assert run["env"]["copy_gbps"] > 0
    checked = pd.read_csv(tmp_path / "correctness.csv")
    assert len(checked) == len(correctness.correctness_cases(True)) and (checked["status"] == "ok").all()
    assert "stage 2 correctness: done" in (tmp_path / "log.txt").read_text()
    # ingest builds a summary from the partial run, saying what is missing
    dest = tmp_path / "results"
    assert ingest.main([str(tmp_path), str(dest), "--readme", str(tmp_path / "no-readme.md")]) == 0
    text = (dest / "SUMMARY.md").read_text()
    assert "CPU rehearsal" in text and "No throughput rows." in text and "cases pass every check" in text


@rehearsal
def test_the_budget_stops_the_run_cleanly(tmp_path):
    proc = rehearse(tmp_path, budget=6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert re.fullmatch(r"stopped at budget after stage \d", run["result"])
    assert run["result"] in (tmp_path / "log.txt").read_text()
    assert run["stages"][-1]["status"] == "not run: budget"
    assert [s["name"] for s in run["stages"]] == STAGE_NAMES


@rehearsal
def test_ingest_summary_and_plots_of_a_full_rehearsal(full_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{ingest.TABLE_START}\nold\n{ingest.TABLE_END}\ny\n")
    dest = tmp_path / "results"
    assert ingest.main([str(full_run), str(dest), "--readme", str(readme)]) == 0
    text = (dest / "SUMMARY.md").read_text()
    for heading in ("## Stages", "## Correctness", "### core", "### broad", "## Plan calibration", "## DRAM traffic"):
        assert heading in text, heading
    assert (dest / "throughput_fwd_fp32_contiguous.png").stat().st_size > 10_000
    assert "old" in readme.read_text()  # a rehearsal never reaches the README's table


def test_readme_table_from_gpu_results(tmp_path):
    """The README's table is derived from committed GPU results (synthetic numbers, never reported)."""
    folder = tmp_path / "results" / "Synthetic_GPU"
    folder.mkdir(parents=True)
    env = dict(device="cuda", gpu="Synthetic GPU", sm_count=132, copy_gbps=3000.0)
    (folder / "run.json").write_text(json.dumps(dict(env=env, stages=[], result="all stages run")))
    rows = []
    for N in (1, 32):
        for provider, ms in (("gn_triton", 1.0), ("torch_eager", 4.0), ("torch_compile", 1.5)):
            gbps = 2400.0 / ms
            rows.append(dict(stage="core", activation="none", provider=provider, mode="fwd", dtype="bf16",
                             layout="contiguous", shape="C320 64x64 G32", N=N, status="ok", ms=ms, gbps=gbps,
                             pct_copy_bw=100 * gbps / 3000))  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "sweep.csv", index=False)
    table = ingest.performance_table(tmp_path / "results")
    assert "| Synthetic GPU | fwd | bf16 | contiguous | 4.00× | 1.50× | 80% | 80% |" in table
    text = f"a\n{ingest.TABLE_START}\nold\n{ingest.TABLE_END}\nb\n"
    assert ingest.update_readme(text, table) == f"a\n{ingest.TABLE_START}\n{table}\n{ingest.TABLE_END}\nb\n"


def test_parse_ncu_csv():
    text = "\n".join([
        "==PROF== Connected to process 1",
        '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"',
        '"0","_gn_fwd_fused_kernel","dram__bytes_read.sum","byte","1,048,576"',
        '"0","_gn_fwd_fused_kernel","dram__bytes_write.sum","Kbyte","512"',
        '"1","elementwise_kernel","sm__cycles.sum","cycle","7"',
    ])  # fmt: skip
    rows = traffic.parse_ncu_csv(text)
    assert [(r["kernel"], r["bytes"]) for r in rows] == [("_gn_fwd_fused_kernel", 1048576.0),
                                                          ("_gn_fwd_fused_kernel", 512e3)]  # fmt: skip
