"""A small forward+backward of every path, for `compute-sanitizer --tool memcheck` on a GPU.

Each plan is forced (fused, fused with several groups per program, split, split in waves) on odd
sizes in both layouts, so that out-of-bounds loads or stores in any masked tile show up.
"""

import argparse

import torch

import gn_triton
from gn_triton import _tuning

PLANS = [
    dict(split=1, block_c=4, block_s=64),
    dict(split=1, groups_per_program=4, block_c=16, block_s=16),
    dict(split=3, block_c=4, block_s=32),
    dict(split=2, block_c=2, block_s=64, wave_blocks=5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (under compute-sanitizer) or cpu (interpreter)")
    device = parser.parse_args().device
    torch.manual_seed(0)
    for plan in PLANS:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float16, torch.float32) if device == "cuda" else (torch.float32,):
                x = torch.randn(3, 12, 9, 13, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
                w = torch.randn(12, device=device, requires_grad=True)
                b = torch.randn(12, device=device, requires_grad=True)
                with _tuning.override_plan(**plan):
                    gn_triton.group_norm(x, 4, w, b).backward(torch.randn_like(x))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize case: forward+backward of {len(PLANS)} plans x 2 layouts on {device} done")


if __name__ == "__main__":
    main()
