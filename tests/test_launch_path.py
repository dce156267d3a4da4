"""Triton's real JIT launch path (binding, specialisation, cache key, ptxas, the launcher's argument
reading) for every kernel of a fused and a split plan and of the parts gn_triton.stats and
gn_triton.distributed run, and the cached launch programs against it (the same binaries, grids and
arguments through the compiled kernels' own entries as through JITFunction.run, over random calls and
changed specialisations), on the CPU: tests/launch_path.py with the stand-in sm_90 driver of
perf/stand_in_driver.py, in a fresh process since the suite's own process runs the interpreter."""

import os

import triton
from gn_testing import python_without_interpreter


def test_every_kernel_launches_through_the_compiled_path(tmp_path):
    # A fresh cache compiles for real: nothing from an earlier run's. Triton 3.9 warns when FP fusion is unset.
    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    run = python_without_interpreter("tests/launch_path.py", timeout=600, TRITON_CACHE_DIR=str(tmp_path),
                                     TRITON_DEFAULT_FP_FUSION=fusion)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"triton {triton.__version__}" in run.stdout
    assert run.stdout.count("refused as expected") == 4  # the harness fails where a real launch would
    from gn_triton import _launch

    assert f"all {len(_launch.KERNELS)} kernels launched" in run.stdout
    assert run.stdout.count("as JITFunction.run chooses") == 6  # each specialisation its own binary
    assert run.stdout.count("launches equal") == 24  # the random calls, each checked
    assert "launch hooks: with a hook set" in run.stdout
    assert "cached programs: every call launched as JITFunction.run launches it" in run.stdout
    assert list(tmp_path.rglob("*.cubin")), "no cubin was compiled"
