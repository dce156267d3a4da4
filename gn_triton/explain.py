"""How gn_triton would run a GroupNorm call, and what the cost model predicts for it (no GPU needed).

    python -m gn_triton.explain 2x128x512x512:32 --dtype bf16 --layout channels_last --device h100

SHAPE is N x C x spatial... with the group count after the colon (default 32). For the forward and
the backward it prints the heuristic plan (the cost model's cheapest; the autotuner times it first
among its few candidates), programs per launch, waves, launches, the predicted HBM bytes against the
floor and the predicted time as % of the device's copy bandwidth. Every figure it prints is a
model's prediction, labelled so, except the measured line, which appears when a GPU run's results
for that device are committed under perf/results/.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

from . import _cost, _tuning
from ._cost import DEVICES, DeviceModel, Prediction
from ._tuning import Plan, Problem

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
RESULTS = Path(__file__).resolve().parents[1] / "perf" / "results"  # present in a checkout of the repository


def parse_shape(text: str) -> tuple[tuple[int, ...], int]:
    """'2x128x512x512:32' -> ((2, 128, 512, 512), 32)."""
    dims, _, groups = text.partition(":")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if len(shape) < 2:
        raise ValueError(f"explain: SHAPE needs at least N and C, e.g. 2x320x64x64:32, got {text!r}")
    return shape, int(groups or 32)


def problem(shape: tuple[int, ...], groups: int, dtype: torch.dtype, channels_last: bool) -> Problem:
    if shape[1] % groups:
        raise ValueError(f"explain: C={shape[1]} is not divisible by num_groups={groups}")
    return Problem(shape[0], shape[1], math.prod(shape[2:]), groups, dtype, channels_last, True, True)


def describe(direction: str, p: Problem, plan: Plan, pred: Prediction, device: DeviceModel) -> list[str]:
    plan = plan.fit(p)
    if plan.split == 1:
        path = f"fused: 1 launch of {pred.programs} programs (a block of {plan.groups_per_program} group(s) each)"
    else:
        spans = plan.span(p.S)[1]
        path = (f"split: {pred.waves} wave(s) of {pred.programs // spans} block(s) x {spans} spans = "
                f"{pred.programs} programs per launch, 2 launches per wave")  # fmt: skip
    tail = " + 1 dweight/dbias reduction" if direction == "bwd" else ""
    return [
        f"  {path}{tail}: {pred.launches} launches per call",
        f"  plan: {plan}",
        f"  HBM bytes: {pred.hbm_bytes / 1e6:.1f} MB predicted vs {pred.floor_bytes / 1e6:.1f} MB floor "
        f"({pred.traffic_over_floor:.2f}x)",
        f"  time: {pred.time_us:.1f} us predicted (GPU {pred.gpu_us:.1f} us, host launches {pred.host_us:.1f} us)"
        f" = {pred.pct_copy_bw(device):.0f}% of the {device.copy_gbps:.0f} GB/s copy bandwidth",
    ]


def measured(device: DeviceModel, direction: str, shape: tuple[int, ...], groups: int, dtype: str, layout: str):
    """gn_triton's measured row for this call in committed GPU results of this device, or None."""
    for path in sorted(RESULTS.glob("*/sweep.csv")):
        if _cost.known_device(path.parent.name.replace("_", " ")) is not _cost.known_device(device.name):
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                if (row["provider"], row["mode"], row["dtype"], row["layout"], row["status"]) != (
                    "gn_triton", direction, dtype, layout, "ok",
                ) or row.get("activation", "none") not in ("none", ""):  # fmt: skip
                    continue
                if (int(row["N"]), int(row["C"]), row["spatial"], int(row["G"])) == (
                    shape[0], shape[1], "x".join(map(str, shape[2:])), groups,
                ):  # fmt: skip
                    return float(row["ms"]) * 1e3, float(row["pct_copy_bw"]), path
    return None


def explain(shape: tuple[int, ...], groups: int, dtype: str, layout: str, device: DeviceModel) -> str:
    p = problem(shape, groups, DTYPES[dtype], layout == "channels_last")
    lines = [
        f"GroupNorm of x {shape}, {groups} groups, {dtype}, {layout}, on {device.name} "
        f"({device.sms} SMs, {device.l2_bytes >> 20} MiB L2, {device.copy_gbps:.0f} GB/s copy, "
        f"{device.launch_us:.0f} us per launch: {device.source})",
        "PREDICTED BY gn_triton's COST MODEL (gn_triton/_cost.py), not measured.",
    ]
    for direction, name in (("fwd", "forward"), ("bwd", "backward")):
        plan, pred = _tuning.ranked_plans(direction, p, device)[0]
        lines += ["", f"{name}:"] + describe(direction, p, plan, pred, device)
        found = measured(device, direction, shape, groups, dtype, layout)
        if found:
            us, pct, path = found
            lines.append(f"  MEASURED: {us:.1f} us = {pct:.0f}% of copy bandwidth ({path.parent.name})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="N x C x spatial... : groups, e.g. 2x128x512x512:32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layout", choices=("contiguous", "channels_last"), default="contiguous")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    args = parser.parse_args(argv)
    try:
        shape, groups = parse_shape(args.shape)
        print(explain(shape, groups, args.dtype, args.layout, DEVICES[args.device]))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
