"""The front page's example runs as written (on a CPU: torch's fallback, and the kernels in Triton's
interpreter), and the sample output of `explain` in docs/planning.md is what explain prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_readme_example_runs(tmp_path, interpret):
    script = tmp_path / "example.py"
    check = f"\nfrom gn_triton import _checks\nassert _checks.INTERPRET == {interpret == '1'}\nprint('example ran')\n"
    script.write_text(readme_example() + check)
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "example ran" in proc.stdout, proc.stderr[-3000:]


def test_readme_stays_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "import torch" in readme_example()
    # links that work where the README is shown as the package's description: no relative links or images
    assert not re.search(r"\]\((?!https?://)", text), re.findall(r"\]\([^)]*\)", text)


def test_planning_docs_show_what_explain_prints():
    text = (ROOT / "docs" / "planning.md").read_text()
    command, shown = re.search(r"```\n\$ (python -m gn_triton\.explain [^\n]+)\n(.*?)```", text, re.S).groups()
    out = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, timeout=120).stdout
    assert shown == out, "regenerate the sample in docs/planning.md"
