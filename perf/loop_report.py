"""Loop-cost report: the instructions each main loop of gn_triton's kernels issues per element, read from
the SASS of an ahead-of-time sm_90 compilation (no GPU needed). Static figures, not measured on a GPU.

    python -m perf.static_report --loops                 # every heuristic plan of the suites
    python -m perf.static_report --loops --json F.json   # also the rows, for a later --loops-compare
    python -m perf.static_report --loops --loops-compare perf/results/static/loops_baseline.json

For every heuristic plan (perf/suites.py shapes x batches, bf16, fp16 and fp32, NCHW and, for 4-D and
5-D shapes, channels_last and channels_last_3d; an H100's plans, weight and bias, no activation) it
compiles the plan's kernels for sm_90 and reads `cuobjdump --dump-sass`. A loop is a backward branch (a
BRA to a lower address); an innermost loop is one that holds no other. Each kernel's element loops are
its last innermost loops (statistics or gradient sums, then the elementwise pass; the split paths'
merges over spans come before and are not element loops). Per loop: the body's instructions / the
elements each thread handles per iteration (tile / (32 x warps)) = instructions per tile element, then
per valid element (divided by the share of the tile's lanes that hold data, Plan.valid_share: masked
rows and positions of the plan's tiles on the shape, the split path's channel chunks included), and the
barriers (BAR) and shuffles (SHFL) inside it.

The issue budget: a GPU issues SMs x 4 schedulers x 32 lanes x clock thread-instructions per second,
and a bandwidth-bound pass moves bytes / (copy bandwidth) elements per second, so it may spend
    budget = SMs x 4 x 32 x clock / (copy bandwidth / bytes per element)
thread-instructions per element (bytes per element: forward 2 x element size, read x and write y;
backward 3 x, read x and dy, write dx) before instruction issue, not memory, sets its speed. Figures
(static, not measured): H100 SXM 132 SMs, ~1.98 GHz, ~3.0 TB/s; H200 132 SMs, ~1.98 GHz, ~4.3 TB/s.
A direction's total is the sum of its element loops per valid element (the code outside loops is
not counted).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gn_triton import _cost, _tuning, kernels
from gn_triton._plan import Plan, Problem
from perf import static_report
from perf.static_report import Spec
from perf.suites import BATCHES, SUITES

BUDGET_DEVICES = {"h100": (132, 1.98e9, 3.0e12), "h200": (132, 1.98e9, 4.3e12)}  # SMs, clock Hz, copy B/s
# Thresholds of a lean kernel, 16-bit input, every layout: instructions per valid element. fp32 moves twice
# the bytes per element, so its issue budget per element is twice as large: its limits are twice these.
LIMITS = {"stats": 8.0, "sums": 8.0, "apply": 10.0, "dx": 10.0, "fwd": 16.0, "bwd": 20.0}
# Each kernel's element loops, in code order: they are its last innermost loops.
ELEMENT_LOOPS = {
    "_gn_fwd_fused_kernel": ("stats", "apply"),
    "_gn_fwd_partial_stats_kernel": ("stats",),
    "_gn_fwd_split_apply_kernel": ("apply",),
    "_gn_bwd_fused_kernel": ("sums", "dx"),
    "_gn_bwd_partial_sums_kernel": ("sums",),
    "_gn_bwd_split_dx_kernel": ("dx",),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The memory formats of the report's rows: (N, C, *spatial) contiguous, channels_last (4-D) and
# channels_last_3d (5-D); (N, C, L) tensors have no channels_last format.
CHANNELS_LAST_NAMES = {2: "nhwc", 3: "ndhwc"}


def layout_name(channels_last: bool, spatial_dims: int) -> str:
    return CHANNELS_LAST_NAMES[spatial_dims] if channels_last else "nchw"


def contiguous_run_aligned(C: int, S: int, channels_last: bool) -> bool:
    """Whether the layout's contiguous run starts on 16 elements (so 16 bytes) and the runtime sees it: NCHW
    rows of S positions (C and S multiples of 16), channels_last pixels of C channels (C a multiple of 16)."""
    return C % 16 == 0 and (channels_last or S % 16 == 0)


def issue_budget(device: str, direction: str, elem_size: int) -> float:
    """Thread-instructions per element a pass may issue at the device's copy bandwidth (static figures)."""
    sms, clock, copy_bytes = BUDGET_DEVICES[device]
    bytes_per_element = (2 if direction == "fwd" else 3) * elem_size
    return sms * 4 * 32 * clock / (copy_bytes / bytes_per_element)


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", re.MULTILINE)


def innermost_loops(sass: str) -> list[dict]:
    """The innermost loops of one kernel's SASS, in address order: body instructions, BAR and SHFL in it."""
    code = [(int(addr, 16), text.strip()) for addr, text in _INSTRUCTION.findall(sass)]
    loops = []
    for addr, text in code:
        target = re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in loops if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    rows = []
    for lo, hi in sorted(inner):
        body = [text for addr, text in code if lo <= addr <= hi]
        ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body]
        rows.append(dict(instructions=len(body), bar=sum(o.startswith("BAR") for o in ops),
                         shfl=sum(o.startswith("SHFL") for o in ops)))  # fmt: skip
    return rows


def compile_sass(spec: Spec, arch: int = 90) -> tuple[str, str]:
    """(resource usage, SASS) of one spec compiled for sm_<arch>, as static_report compiles it."""
    fn = getattr(kernels, spec.kernel)
    signature, constexprs, attrs = static_report._signature(fn, spec)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=spec.num_warps))  # fmt: skip
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"gn_loops_{os.getpid()}_{spec.kernel}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        dump = [static_report._cuobjdump(), str(cubin)]
        usage = subprocess.run([dump[0], "--dump-resource-usage", dump[1]], capture_output=True, text=True, check=True)
        sass = subprocess.run([dump[0], "--dump-sass", dump[1]], capture_output=True, text=True, check=True)
    finally:
        cubin.unlink(missing_ok=True)
    return usage.stdout, sass.stdout


def kernel_loops(spec: Spec) -> dict:
    """Registers, spills and each element loop's instructions per tile element, BAR and SHFL of one spec."""
    try:
        usage, sass = compile_sass(spec)
    except Exception as exc:  # reported: a kernel the compiler rejects
        return dict(error=f"{type(exc).__name__}: {exc}"[:300])
    loops = innermost_loops(sass)
    roles = ELEMENT_LOOPS[spec.kernel]
    if len(loops) < len(roles):
        return dict(error=f"{len(loops)} innermost loops, expected at least {len(roles)}")
    c = dict(spec.constexprs)
    per_thread = c["BLOCK_C"] * c["BLOCK_S"] / (32 * spec.num_warps)
    out = dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
               spill_bytes=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
               widest_load_bits=max(static_report.load_widths(sass), default=0))  # fmt: skip
    for role, loop in zip(roles, loops[-len(roles) :], strict=True):
        out[role] = dict(per_elem=round(loop["instructions"] / per_thread, 2), bar=loop["bar"], shfl=loop["shfl"])
    return out


def plan_specs(p: Problem, plan: Plan, direction: str) -> list[Spec]:
    """The element-loop kernels `plan` launches for `p` in `direction` (the launch table's)."""
    return [s for s in static_report._specs_for_plan(p, plan, direction) if s.kernel in ELEMENT_LOOPS]


def suite_plans() -> list[dict]:
    """Every heuristic plan of the suites (an H100's), one entry per distinct (plan, masked share) of a
    direction, dtype and layout, with the shapes that use it."""
    device = _cost.known_device("h100")
    entries: dict[tuple, dict] = {}
    for dtype, torch_dtype in DTYPES.items():
        for channels_last in (False, True):
            for shapes in SUITES.values():
                for shape in shapes:
                    if channels_last and len(shape.spatial) not in CHANNELS_LAST_NAMES:
                        continue
                    S = int(torch.Size(shape.spatial).numel())
                    layout = layout_name(channels_last, len(shape.spatial))
                    for N in BATCHES:
                        p = Problem(N, shape.C, S, shape.G, torch_dtype, channels_last, True, True)
                        aligned = contiguous_run_aligned(shape.C, S, channels_last)
                        for direction in ("fwd", "bwd"):
                            plan = _tuning.heuristic_plan(direction, p, device)
                            share = round(plan.valid_share(p), 4)
                            vector = p.channel_multiple(plan.groups_per_program)
                            key = (direction, dtype, layout, plan, aligned, share, vector)
                            new = dict(direction=direction, dtype=dtype, layout=layout, plan=plan, aligned=aligned,
                                       valid_share=share, shapes=[], problem=p)  # fmt: skip
                            entry = entries.setdefault(key, new)
                            entry["shapes"].append(f"{N}x{shape.label}")
    return list(entries.values())


def _kernel_loops(spec: Spec) -> tuple[Spec, dict]:
    return spec, kernel_loops(spec)


def run(jobs: int, entries: list[dict] | None = None) -> list[dict]:
    """One row per suite_plans entry: each kernel's element loops, and the direction's total per valid
    element against the H100 and H200 budgets."""
    entries = suite_plans() if entries is None else entries
    specs = {s: None for e in entries for s in plan_specs(e["problem"], e["plan"], e["direction"])}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = dict(pool.map(_kernel_loops, specs))
    rows = []
    for e in entries:
        plan, p = e["plan"], e["problem"]
        row = dict(direction=e["direction"], dtype=e["dtype"], layout=e["layout"],
                   aligned=e["aligned"], split=plan.split > 1, R=plan.groups_per_program, chunks=plan.chunks,
                   tile=f"{plan.block_c}x{plan.block_s}", warps=plan.num_warps,
                   masked=round(1 - e["valid_share"], 4), shapes=e["shapes"], kernels={},
                   channel_vector_bytes=p.channel_multiple(plan.groups_per_program) * p.elem_size)  # fmt: skip
        total, errors = 0.0, []
        for spec in plan_specs(e["problem"], plan, e["direction"]):
            loops = compiled[spec]
            row["kernels"][spec.kernel] = loops
            if "error" in loops:
                errors.append(loops["error"])
                continue
            for role in ELEMENT_LOOPS[spec.kernel]:
                loops[role]["per_valid"] = round(loops[role]["per_elem"] / e["valid_share"], 2)
                total += loops[role]["per_valid"]
        if errors:
            row["error"] = "; ".join(errors)
        else:
            row["total"] = round(total, 2)
            size = DTYPES[e["dtype"]].itemsize
            for device in BUDGET_DEVICES:
                row[f"share_{device}"] = round(total / issue_budget(device, e["direction"], size), 3)
        rows.append(row)
    return rows


def loop_cells(row: dict) -> dict:
    """role -> (per valid element, BAR + SHFL) over the row's kernels."""
    cells = {}
    for loops in row["kernels"].values():
        for role in ("stats", "apply", "sums", "dx"):
            if role in loops:
                cells[role] = (loops[role]["per_valid"], loops[role]["bar"] + loops[role]["shfl"])
    return cells


def wants_128_bit_loads(row: dict) -> bool:
    """Whether a row's loads of x must be 128-bit: its layout's contiguous run is 16-byte aligned and the
    runtime sees it (contiguous_run_aligned), and in channels_last a group's channels fill a 16-byte vector."""
    return row["aligned"] and (row["layout"] == "nchw" or row.get("channel_vector_bytes", 16) >= 16)


def violations(row: dict) -> list[str]:
    """What a row breaks: LIMITS per valid element (twice them for fp32), a barrier or shuffle inside an
    element loop, a spill, or a load narrower than 128 bits where wants_128_bit_loads."""
    if "error" in row:
        return [row["error"]]
    scale = 2.0 if row["dtype"] == "fp32" else 1.0
    out = []
    for role, (per_valid, sync) in loop_cells(row).items():
        if per_valid > scale * LIMITS[role]:
            out.append(f"{role} {per_valid} > {scale * LIMITS[role]}")
        if sync:
            out.append(f"{role}: {sync} BAR/SHFL in the loop")
    if row["total"] > scale * LIMITS[row["direction"]]:
        out.append(f"{row['direction']} total {row['total']} > {scale * LIMITS[row['direction']]}")
    for name, kernel in row["kernels"].items():
        if kernel.get("spill_bytes"):
            out.append(f"{name}: {kernel['spill_bytes']} bytes spilled")
        if wants_128_bit_loads(row) and kernel.get("widest_load_bits", 128) < 128:
            out.append(f"{name}: widest load {kernel['widest_load_bits']} bits")
    return out


def _key(row: dict) -> tuple:
    keys = ("direction", "dtype", "layout", "aligned", "split", "R", "tile", "warps", "masked")
    return (*(row[k] for k in keys), row.get("chunks", 1))  # reports before channel chunks have none


def table(rows: list[dict], before: list[dict] | None = None) -> list[str]:
    """A markdown table, one line per row; with `before`, each total followed by the baseline's."""
    old = {_key(r): r for r in before or []}
    head = "| dir | dtype | layout | path | tile x warps | masked | regs | stats/sums | BAR+SHFL | apply/dx | BAR+SHFL "
    head += "| total | H100 | H200 |" + (" total before |" if before else "") + " shapes (N x shape) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["direction"], r["dtype"], r["layout"], r["split"], r["tile"], r["masked"])):
        shapes = ", ".join(r["shapes"][:3]) + (f" (+{len(r['shapes']) - 3})" if len(r["shapes"]) > 3 else "")
        path = ("split" if r["split"] else "fused") + ("" if r["aligned"] else ", unaligned")
        path += f", R={r['R']}" if r["R"] > 1 else ""
        path += f", {r['chunks']} chunks" if r.get("chunks", 1) > 1 else ""
        start = f"| {r['direction']} | {r['dtype']} | {r['layout']} | {path} | {r['tile']} x {r['warps']} "
        start += f"| {r['masked']:.0%} "
        if "error" in r:
            lines.append(start + f"| ERROR {r['error'][:80]} |")
            continue
        cells = loop_cells(r)
        first = cells.get("stats") or cells.get("sums")
        second = cells.get("apply") or cells.get("dx")
        regs = "/".join(str(k["registers"]) for k in r["kernels"].values())
        line = start + f"| {regs} | {first[0]} | {first[1]} | {second[0]} | {second[1]} | {r['total']} "
        line += f"| {r['share_h100']:.0%} | {r['share_h200']:.0%} |"
        if before:
            prev = old.get(_key(r))
            line += f" {prev['total'] if prev and 'total' in prev else '-'} |"
        lines.append(line + f" {shapes} |")
    return lines


def dump(triton_version: str, kernel_version: str, rows: list[dict]) -> str:
    """The report as JSON, one row per line (small diffs between reports)."""
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    return f'{{"triton": "{triton_version}", "kernel_version": "{kernel_version}", "rows": [\n{lines}\n]}}\n'


def main(jobs: int, json_path: Path | None, compare: Path | None) -> int:
    rows = run(jobs)
    before = json.loads(compare.read_text())["rows"] if compare else None
    budgets = ", ".join(f"{d} {issue_budget(d, 'fwd', 2):.1f} fwd / {issue_budget(d, 'bwd', 2):.1f} bwd"
                        for d in BUDGET_DEVICES)  # fmt: skip
    print(f"Main loops, sm_90, triton {triton.__version__}: instructions per valid element (static, not measured).")
    print(f"bf16 issue budgets per element: {budgets} (SMs x 4 x 32 x clock / (copy bandwidth / bytes per element))")
    print("\n".join(table(rows, before)))
    if json_path:
        json_path.write_text(dump(triton.__version__, kernels.KERNEL_VERSION, rows))
    failed = [(r, v) for r in rows for v in violations(r)]
    for r, v in failed:
        print(f"over the limits: {r['direction']} {r['tile']} x {r['warps']} {r['shapes'][0]}: {v}")
    errors = [r for r in rows if "error" in r]
    print(f"{len(rows)} plans, {len(errors)} failed to compile, {len(failed)} over the limits")
    return 1 if failed or errors else 0
