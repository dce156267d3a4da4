"""How gn_triton would run a GroupNorm call, and what the cost model predicts for it (no GPU needed).

    python -m gn_triton.explain 2x128x512x512:32 --dtype bf16 --layout channels_last --device h100
    python -m gn_triton.explain 1x128x512x512:32 --dtype bf16 --device mi300x   # AMD Instinct: planned, not run

SHAPE is x's shape, N x C x spatial..., with the group count after the colon (default 32); the same
grammar as `python -m perf.sweep --shape`. For the forward and the backward it prints the heuristic
plan (the cost model's cheapest; the autotuner times it first among its few candidates), programs
per launch, waves, launches, the predicted HBM bytes against the floor and the predicted time as %
of the device's copy bandwidth. Every figure it prints is a model's prediction, labelled so, except
the measured line, which appears when a GPU run's results for that device are committed under
perf/results/.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from collections import Counter
from pathlib import Path

import torch

from . import _cost, _tuning
from ._cost import DEVICES, DeviceModel, Prediction
from ._launches import plan_launches
from ._tuning import Plan, Problem

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
RESULTS = Path(__file__).resolve().parents[1] / "perf" / "results"  # present in a checkout of the repository
SHAPE_HELP = "x's shape N x C x spatial... and the groups after a colon (default 32), e.g. 2x320x64x64:32"
DEFAULT_GROUPS = 32
DEFAULTS = {"dtype": "bf16", "layout": "contiguous", "device": "h100"}
LAYOUTS = ("contiguous", "channels_last", "channels_last_3d")  # channels_last_3d: 5-D shapes only


def parse_shape(text: str) -> tuple[tuple[int, ...], int]:
    """'2x128x512x512:32' -> ((2, 128, 512, 512), 32): x's shape (N, C, *spatial) and its groups.
    Raises ValueError, naming the text, on anything else."""
    dims, _, groups = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        G = int(groups or DEFAULT_GROUPS)
    except ValueError:
        raise ValueError(f"SHAPE must be N x C x spatial... : groups, e.g. 2x320x64x64:32, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"SHAPE needs at least N and C, none negative, e.g. 2x320x64x64:32, got {text!r}")
    if G <= 0:
        raise ValueError(f"num_groups must be positive, got num_groups={G}")
    if shape[1] % G:
        raise ValueError(f"C={shape[1]} is not divisible by num_groups={G}")
    if shape[0] * shape[1] // G * math.prod(shape[2:]) == 1:  # torch's group_norm refuses it (ValueError)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")
    return shape, G


def problem(shape: tuple[int, ...], groups: int, dtype: torch.dtype, channels_last: bool) -> Problem:
    return Problem(N=shape[0], C=shape[1], S=math.prod(shape[2:]), G=groups, dtype=dtype,
                   channels_last=channels_last, has_weight=True, has_bias=True)  # fmt: skip


def plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"


def tile_line(p: Problem, plan: Plan) -> str:
    """The plan's tile as the kernels walk it: its rows along the layout's contiguous axis, the share of
    its lanes left masked on this shape, and the elements one aligned load can take (the alignment the
    kernels know: a block's channels in channels_last, a row's start in NCHW)."""
    if p.channels_last:
        rows, along = f"{plural(plan.block_s, 'pixel')} x {plural(plan.block_c, 'channel')}", "channels"
        aligned, row_length = p.channel_multiple(plan.groups_per_program), plan.block_c
    else:
        rows, along = f"{plural(plan.block_c, 'channel')} x {plural(plan.block_s, 'position')}", "positions"
        aligned, row_length = (p.vector if p.S % 16 == 0 else p.row_multiple), plan.block_s
    vector = min(aligned, row_length, p.vector)
    return (f"tile: {rows}, {1 - plan.valid_share(p):.0%} of its lanes masked; loads of up to "
            f"{vector * p.elem_size * 8} bits along {along}")  # fmt: skip


def describe(direction: str, p: Problem, plan: Plan, pred: Prediction, device: DeviceModel) -> list[str]:
    plan = plan.fit(p)
    if plan.split == 1:
        path = (f"fused: 1 launch of {plural(pred.programs, 'program')} "
                f"(a block of {plural(plan.groups_per_program, 'group')} each)")  # fmt: skip
    else:
        spans, chunks = plan.span(p.S)[1], plan.chunk(p)[1]
        plan = dataclasses.replace(plan, split=spans)  # the programs a block actually runs on
        pieces = plural(spans, "span") + (f" x {plural(chunks, 'channel chunk')}" if chunks > 1 else "")
        path = (
            f"split: {plural(pred.waves, 'wave')} of {plural(pred.programs // (spans * chunks), 'block')} x "
            f"{pieces} = {plural(pred.programs, 'program')} per launch, 2 launches per wave"
        )
    kernels = Counter(launch.kernel for launch in plan_launches(direction, p, plan))
    return [
        f"  {path}: {plural(pred.launches, 'launch', 'launches')} per call",
        "  kernels: " + ", ".join(f"{name} x{count}" for name, count in kernels.items()),
        f"  plan: {plan}",
        "  " + tile_line(p, plan),
        f"  HBM bytes: {pred.hbm_bytes / 1e6:.1f} MB predicted vs {pred.floor_bytes / 1e6:.1f} MB floor "
        f"({pred.traffic_over_floor:.2f}x)",
        f"  time: {pred.time_us:.1f} us predicted (GPU {pred.gpu_us:.1f} us, host {pred.host_us:.1f} us)"
        f" = {pred.pct_copy_bw(device):.0f}% of the {device.copy_gbps:.0f} GB/s copy bandwidth",
        "  HOST-BOUND: in eager mode the GPU waits for the call's host path (CUDA graphs, or torch.compile's "
        "cudagraph modes, remove it)"
        if pred.host_bound
        else "  GPU-bound: the host path is hidden behind the GPU's work",
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
    if device.vendor == "amd":  # second reads are modelled from the Infinity Cache (gn_triton/_cost.py)
        units = (f"{device.sms} CUs, wavefront {device.warp_size}, {device.l2_bytes >> 20} MiB L2 per XCD, "
                 f"{device.mall_bytes >> 20} MiB Infinity Cache")  # fmt: skip
        figures = device.source  # says where the CUs and caches come from
    else:
        units = f"{device.sms} SMs, {device.l2_bytes >> 20} MiB L2"
        figures = f"SMs and L2 from the spec sheet; {device.source}"
    lines = [
        f"GroupNorm of x {shape}, {plural(groups, 'group')}, {dtype}, {layout}, on {device.name} "
        f"({units}, {device.copy_gbps:.0f} GB/s copy; host {device.call_us:.1f} us per call + "
        f"{device.launch_us:.1f} us per launch)",
        f"Device figures: {figures}.",
        f"Defaults where not given: {DEFAULT_GROUPS} groups, "
        + ", ".join(f"--{name} {value}" for name, value in DEFAULTS.items())
        + " (python -m gn_triton.explain --help).",
    ]
    if math.prod(shape) == 0:
        return "\n".join(lines + ["Empty input: no kernel is launched; the result is empty (dweight and dbias, "
                                  "when asked for, are zero)."])  # fmt: skip
    p = problem(shape, groups, DTYPES[dtype], layout.startswith("channels_last"))  # 3-D: the same plan
    lines.append("PREDICTED BY gn_triton's COST MODEL (gn_triton/_cost.py), not measured.")
    for direction, name in (("fwd", "forward"), ("bwd", "backward")):
        plan, pred = _tuning.ranked_plans(direction, p, device)[0]
        lines += ["", f"{name}:"] + describe(direction, p, plan, pred, device)
        found = measured(device, direction, shape, groups, dtype, layout.removesuffix("_3d"))  # perf.sweep's name
        if found:
            us, pct, path = found
            lines.append(f"  MEASURED: {us:.1f} us = {pct:.0f}% of copy bandwidth ({path.parent.name})")
    if not RESULTS.is_dir():  # an installed wheel or a kernels-hub copy holds no results
        lines += ["", "No measured results here: they are read from perf/results/ in a checkout of the repository."]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default in --help."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gn_triton.explain", description=__doc__,
                                     formatter_class=_HelpFormatter)  # fmt: skip
    parser.add_argument("shape", metavar="SHAPE", help=SHAPE_HELP)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=DEFAULTS["dtype"], help="x's dtype")
    parser.add_argument("--layout", choices=LAYOUTS, default=DEFAULTS["layout"],
                        help="x's memory format (channels_last_3d: 5-D shapes, planned as channels_last)")  # fmt: skip
    parser.add_argument("--device", choices=sorted(DEVICES), default=DEFAULTS["device"], help="the modelled GPU")
    args = parser.parse_args(argv)
    try:
        shape, groups = parse_shape(args.shape)
    except ValueError as exc:
        parser.error(str(exc))
    if args.layout == "channels_last_3d" and len(shape) != 5:
        parser.error(f"--layout channels_last_3d needs a 5-D SHAPE (N x C x D x H x W), got {len(shape)}-D {shape}")
    print(explain(shape, groups, args.dtype, args.layout, DEVICES[args.device]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
