"""Static kernel report: compile gn_triton's kernels ahead of time for NVIDIA and AMD GPUs, no GPU needed.

    python -m perf.static_report            # every kernel of every plan the autotuner can pick
    python -m perf.static_report --quick    # the heuristic plans and the largest tiles (the test suite)
    make static-report TRITON_SPEC=triton==3.6.0 STATIC_ARGS=--quick   # under another triton
    python -m perf.static_report --quick --compare before.json   # a refactor: same code, variant by variant
    python -m perf.static_report --quick --target gfx942,gfx950   # AMD Instinct (perf/amd_report.py)
    python -m perf.static_report --loops    # instructions per element of every main loop (perf/loop_report.py)

For each kernel and config it compiles a cubin for sm_80 and sm_90 with the same divisibility-by-16
specialisation the runtime applies to aligned pointers and sizes, and reads with the cuobjdump that
ships in the triton wheel: registers, local-memory (spill) bytes, shared memory, the widest global
load of the kernel (LDG.E.128 = 128-bit, vectorised) and the number of global loads. It must run
without TRITON_INTERPRET: the interpreter replaces the kernels with Python. --target gfx942,gfx950
compiles the plans of an MI300X / MI355X model (64-wide wavefronts) for AMD Instinct instead, and reads
VGPRs, scratch, LDS and load widths from the amdgcn text (perf/amd_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gn_triton import _cost, _tuning, kernels
from gn_triton._launches import PARTS, default_needs, plan_launches, plan_part_launches
from gn_triton._tuning import Plan, Problem

from . import amd_report

ARCHS = (80, 90)
TARGETS = ",".join(f"sm{arch}" for arch in ARCHS)  # --target's default; gfx942 and gfx950 are AMD Instinct

# Problems whose candidate plans span what the autotuner can pick: batch 1 and 32 of SD/VAE-like
# shapes, a tiny-row shape, NCHW and NHWC, 16- and 32-bit.
SUITE = [
    (1, 320, 64 * 64, 32),
    (32, 320, 64 * 64, 32),
    (1, 128, 256 * 256, 32),
    (64, 256, 7 * 7, 32),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
TL_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel compiled with one set of constexprs."""

    kernel: str
    dtype: str
    channels_last: bool
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    divisible: tuple[str, ...]  # the sizes (C, S) that are multiples of 16: the runtime specialises them so

    @property
    def aligned(self) -> bool:
        """C and S both multiples of 16."""
        return self.divisible == ("C", "S")


def divisible_sizes(C: int, S: int) -> tuple[str, ...]:
    """Which of C and S the runtime specialises as divisible by 16 (channels_last loads along channels
    need only C; NCHW rows need S)."""
    return tuple(name for name, value in (("C", C), ("S", S)) if value % 16 == 0)


def _specs_for_plan(p: Problem, plan: Plan, direction: str | None = None) -> list[Spec]:
    """The kernels `plan` launches for `p` (both directions, every gradient; or `direction`'s), as the
    launch table lists them, each with its constexprs flat (the Epilogue/Layout bundles' fields) and
    its warps: what the runtime would compile."""
    dtype = next(name for name, t in DTYPES.items() if t == p.dtype)
    specs = {}
    directions = (direction,) if direction else ("fwd", "bwd")
    launches = [launch for d in directions for launch in plan_launches(d, p, plan)]
    if direction is None:  # and the parts of gn_triton.stats and gn_triton.distributed
        launches += [launch for part in PARTS for launch in plan_part_launches(part, p, plan, default_needs(p)[1:])]
    for launch in launches:
        flat = {}
        for name, value in launch.constexprs.items():
            if name in ("num_warps", "ACC"):  # the spec's warps; ACC follows the dtype (_signature)
                continue
            flat.update(value._asdict() if isinstance(value, tuple) else {name: value})
        items = tuple(sorted(flat.items()))
        warps = launch.constexprs.get("num_warps", 4)  # the runtime's default where a launch gives none
        specs[Spec(launch.kernel, dtype, p.channels_last, items, warps, divisible_sizes(p.C, p.S))] = None
    return list(specs)


def _tile_elems(spec: Spec) -> tuple[int, int]:
    """(tile elements, elements per thread): the larger, the more registers a spec needs."""
    c = dict(spec.constexprs)
    elems = c.get("BLOCK_C", 1) * c.get("BLOCK_S", 1)
    return elems, elems // (32 * spec.num_warps)


def _with(spec: Spec, **constexprs) -> Spec:
    return dataclasses.replace(spec, constexprs=tuple(sorted({**dict(spec.constexprs), **constexprs}.items())))


def all_specs(quick: bool, device: _cost.DeviceModel | None = None) -> list[Spec]:
    """The specs of every plan the autotuner can pick for SUITE (it times `candidate_plans`; quick:
    the heuristic plans), and in both modes the largest tile of every kernel in every dtype and
    layout anywhere in the plan space (GN_TRITON_TUNE_CANDIDATES=all times them all): the specs a
    compiler is most likely to reject (triton 3.6 rejected large fused-backward tiles) or spill on."""
    device = device or _cost.known_device("h100")  # plans for an H100 unless told (AMD: amd_report.device_for)
    heuristic: dict[Spec, None] = {}
    candidates: dict[Spec, None] = {}
    largest: dict[tuple, Spec] = {}
    for torch_dtype in DTYPES.values():
        for channels_last in (False, True):
            for N, C, S, G in SUITE:
                p = Problem(N, C, S, G, torch_dtype, channels_last, True, True)
                for direction in ("fwd", "bwd"):
                    plan = _tuning.heuristic_plan(direction, p, device)
                    heuristic.update(dict.fromkeys(_specs_for_plan(p, plan)))
                    for plan in _tuning.candidate_plans(direction, p, device):
                        candidates.update(dict.fromkeys(_specs_for_plan(p, plan)))
                    for plan in _tuning.plan_space(direction, p, device):
                        for spec in _specs_for_plan(p, plan):
                            key = (spec.kernel, spec.dtype, spec.channels_last)
                            if key not in largest or _tile_elems(spec) > _tile_elems(largest[key]):
                                largest[key] = spec
    if quick:  # heuristic plans: fp16 in both layouts, the other dtypes in one
        specs = {s: None for s in heuristic if s.dtype == "fp16" or not s.channels_last}
    else:  # fp64 (gradcheck, references) is no speed target: its heuristic plans and largest tiles
        specs = {s: None for s in candidates if s.dtype != "fp64"} | heuristic
    specs.update(dict.fromkeys(largest.values()))
    for spec in largest.values():  # the fused backward without dx, or without the partials
        if spec.kernel == "_gn_bwd_fused_kernel":
            specs[_with(spec, NEEDS_DX=False)] = None
            specs[_with(spec, NEEDS_PARTIALS=False)] = None
    # Tensors over 2^31 elements (int64 offsets) and fused activations, on the default plans.
    p = Problem(*SUITE[0], torch.float16, False, True, True)
    for direction in ("fwd", "bwd"):
        plan = _tuning.heuristic_plan(direction, p, device)
        for spec in _specs_for_plan(p, plan):
            if "INDEX_64" in dict(spec.constexprs):  # the kernels that address x (not the parameter reductions)
                specs[_with(spec, INDEX_64=True)] = None
        for activation in (1, 2, 3):  # the fused SiLU / GELU / GELU-tanh epilogues, with scale-shift
            epilogue = dataclasses.replace(p, dtype=torch.bfloat16, activation=activation, has_scale=activation == 1,
                                           has_shift=activation == 1)  # fmt: skip
            specs.update(dict.fromkeys(_specs_for_plan(epilogue, plan)))
    # The small parameter-gradient kernels, in each parameter dtype (fp64 statistics for fp64).
    for dtype in TL_DTYPES:
        dparams = dict(BLOCK_N=16, BLOCK_C=128, HAS_SCALE=True, NEEDS_DW=True, NEEDS_DB=True)
        specs[Spec("_gn_bwd_dparams_kernel", dtype, False, tuple(sorted(dparams.items())), 4, ("C", "S"))] = None
        dmod = dict(BLOCK_C=128, HAS_WEIGHT=True, HAS_BIAS=True, NEEDS_DSCALE=True, NEEDS_DSHIFT=True)
        specs[Spec("_gn_bwd_dscale_shift_kernel", dtype, False, tuple(sorted(dmod.items())), 4, ("C", "S"))] = None
    return list(specs)


def _signature(fn, spec: Spec) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource: pointers and i32 sizes marked divisible by 16,
    as the runtime marks 16-byte-aligned pointers and multiple-of-16 sizes."""
    constexprs = dict(spec.constexprs)
    constexprs["ACC"] = tl.float64 if spec.dtype == "fp64" else tl.float32
    for name, bundle in (("EPILOGUE", kernels.Epilogue), ("LAYOUT", kernels.Layout)):  # a spec's flags, flat
        if name in fn.arg_names:
            constexprs[name] = bundle(*(constexprs.pop(field) for field in bundle._fields))
    stats = "*fp64" if spec.dtype == "fp64" else "*fp32"
    data = TL_DTYPES[spec.dtype]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ("X", "Y", "DY", "DX", "W", "B", "DW", "DB", "Scale", "Shift", "DScale", "DShift"):
            signature[name] = data  # the parameters' dtype is the input's (a 16-bit model's weights)
        elif name in ("Mean", "MeanLo", "Rstd", "Partials", "CoefX", "Coef1"):
            signature[name] = stats  # statistics and workspaces
        elif name in ("eps_hi", "eps_lo"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        sizes = spec.divisible
        span_aligned = constexprs.get("BLOCK_S", 0) % 16 == 0  # a span is a whole number of tiles
        if signature[name].startswith("*") or name in sizes or (name == "span" and span_aligned):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def load_widths(sass: str) -> list[int]:
    """The width in bits of every global load in a SASS listing: LDG (and LDGSTS, global to shared)
    with its modifiers, e.g. LDG.E.U16 (16), LDG.E (32), LDG.E.64.CONSTANT (64),
    LDGSTS.E.BYPASS.LTC128B.128 (128: LTC128B is a cache hint, not a width)."""
    widths = []
    for modifiers in re.findall(r"\bLDG(?:STS)?((?:\.[A-Z0-9_]+)*)", sass):
        sizes = [m for m in modifiers.split(".") if re.fullmatch(r"[US]?(?:8|16|32|64|128)", m)]
        widths.append(int(sizes[-1].lstrip("US")) if sizes else 32)
    return widths


def compile_and_inspect(spec: Spec, arch: int | str) -> dict:
    """Compile one spec for sm_<arch> (or an AMD gfx arch); registers, spills, shared memory and widest
    global load."""
    fn = getattr(kernels, spec.kernel)
    signature, constexprs, attrs = _signature(fn, spec)
    row = dict(kernel=spec.kernel, dtype=spec.dtype, channels_last=spec.channels_last, aligned=spec.aligned,
               arch=f"sm_{arch}", num_warps=spec.num_warps, **dict(spec.constexprs))  # fmt: skip
    if str(arch).startswith("gfx"):
        return amd_report.compile_and_inspect(spec, arch, (signature, constexprs, attrs), row)
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=spec.num_warps),
        )
    except Exception as exc:  # report it: a kernel the compiler rejects is what this report is for
        return dict(row, error=f"{type(exc).__name__}: {exc}"[:500])
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"gn_{os.getpid()}_{spec.kernel}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_cuobjdump(), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    finally:
        cubin.unlink(missing_ok=True)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    widths = load_widths(sass)
    return dict(row, registers=registers, spill_bytes=local, shared_bytes=shared,
                widest_load_bits=max(widths, default=0), global_loads=len(widths))  # fmt: skip


def _inspect(args: tuple[Spec, int]) -> dict:
    return compile_and_inspect(*args)


def run(quick: bool, jobs: int, targets: str = TARGETS) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("static_report compiles real kernels: run it without TRITON_INTERPRET=1")
    unknown = [t for t in targets.split(",") if not re.fullmatch(r"sm\d+", t) and t not in amd_report.DEVICE_OF_ARCH]
    if unknown:
        raise SystemExit(f"--target: unknown {unknown}; e.g. sm80,sm90,{','.join(amd_report.DEVICE_OF_ARCH)}")
    archs = [int(t.removeprefix("sm")) if t.startswith("sm") else t for t in targets.split(",")]
    devices = {arch: amd_report.device_for(arch) if arch in amd_report.DEVICE_OF_ARCH else None for arch in archs}
    specs = {device: all_specs(quick, device) for device in dict.fromkeys(devices.values())}
    work = [(spec, arch) for arch in archs for spec in specs[devices[arch]]]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_inspect, work))


def launches_per_call() -> list[str]:
    """The number of launches each path makes, for the report's header."""
    return [
        "forward  fused: 1 launch            | split: 2 launches per wave (partial stats, merge+apply)",
        "backward fused: 1 launch (+1 tiny dweight/dbias reduction) | split: 2 per wave (+1 tiny reduction)",
        "floor bytes: forward = read x + write y; backward = read x, dy + write dx",
    ]


METRICS = ("registers", "spill_bytes", "shared_bytes", "widest_load_bits", "global_loads", "error")


def compare(before: list[dict], after: list[dict]) -> list[str]:
    """Variant by variant (kernel, dtype, layout, arch, warps, constexprs), what differs between two
    reports in the metrics: a refactor that should not change the generated code shows none."""

    def variants(rows):
        return {tuple(sorted((k, str(v)) for k, v in r.items() if k not in METRICS)): r for r in rows}

    old, new = variants(before), variants(after)
    lines = [f"only in one report: {dict(key)}" for key in old.keys() ^ new.keys()]
    for key in old.keys() & new.keys():
        changed = {m: (old[key].get(m), new[key].get(m)) for m in METRICS if old[key].get(m) != new[key].get(m)}
        if changed:
            lines.append(f"{new[key]['kernel']} {new[key]['dtype']} {new[key]['arch']} {dict(key)}: {changed}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="heuristic plans and largest tiles (the tests)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compare", type=Path, help="a report's JSON (--json) to compare variant by variant")
    parser.add_argument("--target", default=TARGETS, help=f"comma-separated: sm80, sm90, gfx942, gfx950 ({TARGETS})")
    parser.add_argument("--loops", action="store_true", help="the main loops' cost per element (perf/loop_report.py)")
    parser.add_argument("--loops-compare", type=Path, help="with --loops: a loop report's JSON to show beside")
    args = parser.parse_args(argv)
    if args.loops:
        from perf import loop_report

        return loop_report.main(args.jobs, args.json, args.loops_compare)
    rows = run(args.quick, args.jobs, args.target)
    print("\n".join(launches_per_call()))
    header = f"{'kernel':32} {'dtype':5} {'layout':6} {'arch':6} {'warps':>5} {'tile':>9} {'regs':>4} "
    print(header + f"{'spill':>5} {'smem':>6} {'ldg':>4} {'loads':>5}")
    for r in rows:
        tile = f"{r.get('BLOCK_C', '-')}x{r.get('BLOCK_S', '-')}"
        layout = "nhwc" if r["channels_last"] else "nchw"
        start = f"{r['kernel']:32} {r['dtype']:5} {layout:6} {r['arch']:6} {r['num_warps']:>5} {tile:>9} "
        if "error" in r:
            print(start + "ERROR " + r["error"])
        else:
            print(
                start + f"{r['registers']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>6} {r['widest_load_bits']:>4} "
                f"{r['global_loads']:>5}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if "error" in r]
    for part, spill, registers in (("sm", "spill", "registers"), ("gfx", "scratch", "VGPRs")):
        mine = [r for r in rows if r["arch"].startswith(part)]
        compiled = [r for r in mine if "error" not in r]
        if mine:
            print(f"triton {triton.__version__}{'' if part == 'sm' else ' ' + part}: {len(mine)} compilations, "
                  f"{len(mine) - len(compiled)} failed, {sum(1 for r in compiled if r['spill_bytes'])} {spill}, "
                  f"max {registers} {max((r['registers'] for r in compiled), default=0)}")  # fmt: skip
    if args.compare:
        differences = compare(json.loads(args.compare.read_text()), rows)
        print("\n".join(differences) or f"identical to {args.compare}, variant by variant")
        return 1 if failed or differences else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
