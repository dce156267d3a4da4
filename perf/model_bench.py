"""A real model's forward+backward with and without gn_triton (GPU): diffusers' SD-like UNet2DModel
and AutoencoderKL from random-init configs (nothing downloaded).

    python -m perf.model_bench [--out DIR] [--dtype bf16] [--batch 1 4] [--providers ...]

Providers: torch (eager), gn_triton (eager, convert_model with activation fusion), torch.compile
(Inductor's own GroupNorm) and torch.compile+fusion (the same unconverted model compiled with
gn_triton.enable_compile_fusion()). Compiled providers get a fresh, static-shape compilation per
model and batch; its time is reported as compile_s (first forward+backward).

Writes model_bench.csv (after every model and batch, so a time box keeps what was measured): model,
batch, dtype, provider, ms (median), compile_s, and max_output_difference against torch eager. Needs a
GPU and the `models` extra; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"


def models():
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                 block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                                 down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)  # fmt: skip
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                                  block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
    return {
        "sd_unet_64": (
            unet,
            lambda n, dt: (torch.randn(n, 4, 64, 64, device=DEVICE, dtype=dt), torch.full((n,), 500, device=DEVICE)),
        ),  # fmt: skip
        "sd_vae_256": (vae, lambda n, dt: (torch.randn(n, 3, 256, 256, device=DEVICE, dtype=dt),)),
    }


PROVIDERS = ("torch", "gn_triton", "torch.compile", "torch.compile+fusion")


def _runner(provider: str, base, converted):
    """(callable model, context its calls run in) for a provider. A compiled provider starts from
    torch.compiler.reset(): Dynamo's cache does not key on Inductor's passes, so the other compiled
    provider's graph would otherwise be reused."""
    import contextlib

    import gn_triton

    if provider == "torch":
        return base, contextlib.nullcontext()
    if provider == "gn_triton":
        return converted, contextlib.nullcontext()
    torch.compiler.reset()
    fusion = gn_triton.enable_compile_fusion if provider == "torch.compile+fusion" else gn_triton.disable_compile_fusion
    return torch.compile(base, dynamic=False), fusion()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("model_bench: no GPU present, nothing timed")
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("model_bench: diffusers not installed (pip install -e '.[models]'), nothing timed")
        return 0
    import time

    import pandas as pd
    import triton.testing

    import gn_triton

    dtype = DTYPES[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (model, make) in models().items():
        base = model.to(DEVICE, dtype).train()
        converted = gn_triton.convert_model(copy.deepcopy(base), activation_fusion=True)
        for n in args.batch:
            inputs = make(n, dtype)
            ms, reference = {}, None
            for provider in args.providers:
                m, context = _runner(provider, base, converted)
                with context:

                    def step(m=m, inputs=inputs):
                        m.zero_grad(set_to_none=True)
                        m(*inputs).sample.float().square().mean().backward()

                    start = time.perf_counter()
                    step()  # compiles a compiled provider (forward and backward)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - start
                    out = m(*inputs).sample.detach().float()
                    ms[provider] = triton.testing.do_bench(step, warmup=3, rep=20)
                if reference is None and provider == "torch":
                    reference = out
                diff = float("nan") if reference is None else (out - reference).abs().max().item()
                rows.append(dict(model=name, batch=n, dtype=args.dtype, provider=provider, ms=ms[provider],
                                 compile_s=compile_s if "compile" in provider else 0.0,
                                 max_output_difference=diff))  # fmt: skip
            pd.DataFrame(rows).to_csv(args.out / "model_bench.csv", index=False)
            print(f"{name} batch {n}: " + ", ".join(f"{p} {t:.2f} ms" for p, t in ms.items()))
            for slower, faster in (("torch", "gn_triton"), ("torch.compile", "torch.compile+fusion")):
                if slower in ms and faster in ms:
                    print(f"  {faster} vs {slower}: x{ms[slower] / ms[faster]:.2f}")
    print(f"wrote {args.out / 'model_bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
