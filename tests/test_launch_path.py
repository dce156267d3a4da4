"""Triton's real JIT launch path (binding, specialisation, cache key, ptxas, the launcher's argument
reading) for every kernel of a fused and a split plan, on the CPU: tests/launch_path.py with a fake
sm_90 driver, in a fresh process since the suite's own process runs the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import triton


def test_every_kernel_launches_through_the_compiled_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real: nothing from an earlier run's cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    script = Path(__file__).with_name("launch_path.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"triton {triton.__version__}" in run.stdout
    assert run.stdout.count("refused as expected") == 4  # the harness fails where a real launch would
    assert "all 8 kernels launched" in run.stdout
    assert list(tmp_path.rglob("*.cubin")), "no cubin was compiled"
