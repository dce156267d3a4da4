"""The notebooks run top to bottom on this machine, in fast mode (GN_NOTEBOOK_FAST=1), in fresh
kernels; their committed copies carry no outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("mnist1d")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_three_notebooks():
    assert NAMES == ["01_quickstart.ipynb", "02_performance.ipynb", "03_batch_size_robustness.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name):
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / "run.py"), "--fast", name], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    for cell in notebook["cells"]:
        assert not cell.get("outputs") and cell.get("execution_count") is None, name
