"""A small forward+backward of every path, for `compute-sanitizer --tool memcheck` on a GPU.

Each forced path of the tests' table (tests/cases.py: fused, fused with several groups per program,
split, split in waves, split with several groups per program, all on small tiles) on odd sizes (C/G = 3,
a sample's last block of groups part empty, 15 positions) in both layouts, so that out-of-bounds loads
or stores in any masked tile show up.
"""

import argparse
import sys
from pathlib import Path

import torch

import gn_triton

# The plans are the test suite's (tests/cases.py, plain data), so that the sanitizer checks the paths
# the tests force. The script runs as `python perf/sanitize_case.py` from a checkout, where tests/ is
# not on the path: put it there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cases import PATHS  # noqa: E402
from gn_testing import forced  # noqa: E402

SIZE, GROUPS = (2, 9, 3, 5), 3  # small: the CPU rehearsal runs it in the interpreter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (under compute-sanitizer) or cpu (interpreter)")
    device = parser.parse_args().device
    torch.manual_seed(0)
    for path in PATHS:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float16, torch.float32) if device == "cuda" else (torch.float32,):
                x = torch.randn(SIZE, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
                w = torch.randn(SIZE[1], device=device, requires_grad=True)
                b = torch.randn(SIZE[1], device=device, requires_grad=True)
                with forced(path):
                    gn_triton.group_norm(x, GROUPS, w, b).backward(torch.randn_like(x))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize case: forward+backward of {len(PATHS)} paths x 2 layouts on {device} done")


if __name__ == "__main__":
    main()
