"""Stage 1: the environment (GPU, SMs, L2, clocks, driver, versions), the copy bandwidth, the
launch costs the cost model takes as defaults until a run like this one measures them, and where
typical calls are bound (host_path: each call's time as an eager loop sees it against its GPU time
alone, gn_triton beside torch eager)."""

from __future__ import annotations

import os
import platform
import sys

import torch

from ..measure import Timer, copy_bandwidth, git_commit, run_columns
from .job import Clock, Context, Job, autotune, run_text

NVIDIA_SMI_QUERY = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"


def stage_env(job: Job, ctx: Context, clock: Clock) -> str:
    import triton

    import gn_triton

    env = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
               gn_triton=gn_triton.__version__, commit=git_commit(), kernel_version=gn_triton.kernels.KERNEL_VERSION,
               platform=platform.platform(),
               cpu_count=os.cpu_count(), device=ctx.device)  # fmt: skip
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, l2_bytes=props.L2_cache_size,
                   memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda, hip=getattr(torch.version, "hip", None),
                   arch=getattr(props, "gcnArchName", ""),  # ROCm: gfx942 (MI300X/MI325X), gfx950 (MI355X)
                   nvidia_smi=run_text(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"]))  # fmt: skip
    else:
        env.update(gpu=f"cpu-{platform.machine()}-rehearsal", sm_count=0)
    job.run["env"] = env
    job.save()
    ctx.timer = Timer(ctx.device, ctx.rep_ms)
    ctx.copy_gbps = copy_bandwidth(ctx.device, ctx.timer)
    env["copy_gbps"] = round(ctx.copy_gbps, 1)
    with autotune(False):
        env.update(launch_costs(ctx))
        env["host_path"] = host_path(ctx, clock)
    ctx.run = run_columns(ctx.device, env["gpu"], ctx.copy_gbps, stage="")
    job.save()
    return f"{env['gpu']}: copy {env['copy_gbps']} GB/s, gn_triton tiny call {env['gn_triton_call_us']:.1f} us"


def launch_costs(ctx: Context) -> dict:
    """Microseconds per call of a tiny gn_triton call and a tiny torch op, launched back to back from
    Python (host-bound); the cost of one more Triton launch (a 16-launch plan against a 1-launch plan
    of the same call: the cost model's launch_us); and the gn_triton call replayed in a CUDA graph
    (the GPU side alone)."""
    import gn_triton
    from gn_triton import _tuning

    x = torch.randn(1, 32, 8, 8, device=ctx.device)
    ones = torch.ones(1, device=ctx.device)
    calls = 200 if ctx.device == "cuda" else 5

    def per_call(fn):
        fn()
        ctx.sync()
        return ctx.timed(lambda: [fn() for _ in range(calls)]) / calls * 1e6

    out = dict(gn_triton_call_us=per_call(lambda: gn_triton.group_norm(x, 8)),
               torch_tiny_op_us=per_call(lambda: ones.add_(1)))  # fmt: skip
    with _tuning.override_plan(split=1, groups_per_program=1, block_s=32):
        one = per_call(lambda: gn_triton.group_norm(x, 8))
    with _tuning.override_plan(split=2, groups_per_program=1, block_s=32, wave_blocks=1):  # 8 waves x 2
        sixteen = per_call(lambda: gn_triton.group_norm(x, 8))
    out["launch_us"] = (sixteen - one) / 15
    if ctx.device == "cuda":
        import triton.testing

        out["gn_triton_call_graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(lambda: gn_triton.group_norm(x, 8))
    return out


# (label, shape, groups): calls that are short on the GPU, where the host path may be what the GPU waits on.
HOST_PATH_SHAPES = [
    ("SD U-Net 1x1280x8x8", (1, 1280, 8, 8), 32),
    ("SD U-Net 2x320x64x64", (2, 320, 64, 64), 32),
    ("SD VAE 1x512x128x128", (1, 512, 128, 128), 32),
]


def host_path(ctx: Context, clock: Clock) -> list[dict]:
    """Per shape (bf16, weight and bias, SiLU after the norm), gn_triton and torch eager measured two
    ways: calls issued back to back from Python (`eager_loop_us`: per call, the GPU's work included:
    what a user's eager loop sees, host path and all) and the same call replayed from a CUDA graph
    (`graph_us`: the GPU's time alone); a training step (forward and autograd.grad) back to back.
    `bound` says which side sets the eager time. A rehearsal runs a tiny shape in the interpreter."""
    shapes = HOST_PATH_SHAPES if ctx.device == "cuda" else [("tiny 1x8x4x4", (1, 8, 4, 4), 4)]
    rows = []
    for label, shape, groups in shapes:
        if clock.hit:
            break
        for provider in ("gn_triton", "torch"):
            rows.append(_host_path_row(ctx, label, shape, groups, provider))
    return rows


def _host_path_row(ctx: Context, label: str, shape: tuple, groups: int, provider: str) -> dict:
    import torch.nn.functional as F

    import gn_triton

    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    calls = 200 if ctx.device == "cuda" else 2
    x = torch.randn(shape, device=ctx.device, dtype=dtype)
    w, b = (torch.randn(shape[1], device=ctx.device, dtype=dtype) for _ in range(2))
    if provider == "gn_triton":
        fn = lambda x, w, b: gn_triton.group_norm(x, groups, w, b, activation="silu")  # noqa: E731
    else:
        fn = lambda x, w, b: F.silu(F.group_norm(x, groups, w, b))  # noqa: E731
    row = dict(shape=label, provider=provider, dtype=str(dtype).replace("torch.", ""))
    with torch.no_grad():
        fn(x, w, b)
        ctx.sync()
        row["eager_loop_us"] = ctx.timed(lambda: [fn(x, w, b) for _ in range(calls)]) / calls * 1e6
        if ctx.device == "cuda":
            import triton.testing

            row["graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(lambda: fn(x, w, b))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = torch.randn_like(x)

    def step():
        torch.autograd.grad(fn(*leaves), leaves, dy)

    step()
    row["step_eager_loop_us"] = ctx.timed(lambda: [step() for _ in range(calls)]) / calls * 1e6
    if "graph_us" in row:
        row["bound"] = "host" if row["eager_loop_us"] > 1.2 * row["graph_us"] else "GPU"
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
