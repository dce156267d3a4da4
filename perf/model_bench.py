"""A real model's forward+backward with and without gn_triton (GPU): diffusers' SD-like UNet2DModel
and AutoencoderKL from random-init configs (nothing downloaded), converted with convert_model.

    python -m perf.model_bench [--out DIR] [--dtype bf16] [--batch 1 4]

Writes model_bench.csv: model, batch, dtype, provider (torch / gn_triton), ms (median), and the
outputs' max difference. Needs a GPU and the `models` extra; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
            lambda n, dt: (torch.randn(n, 4, 64, 64, device="cuda", dtype=dt), torch.full((n,), 500, device="cuda")),
        ),  # fmt: skip
        "sd_vae_256": (vae, lambda n, dt: (torch.randn(n, 3, 256, 256, device="cuda", dtype=dt),)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("model_bench: no GPU present, nothing timed")
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("model_bench: diffusers not installed (pip install -e '.[models]'), nothing timed")
        return 0
    import pandas as pd
    import triton.testing

    import gn_triton

    dtype = DTYPES[args.dtype]
    rows = []
    for name, (model, make) in models().items():
        base = model.to("cuda", dtype).train()
        ours = gn_triton.convert_model(copy.deepcopy(base), activation_fusion=True)
        for n in args.batch:
            inputs = make(n, dtype)
            outs = {}
            for provider, m in (("torch", base), ("gn_triton", ours)):

                def step(m=m, inputs=inputs):
                    m.zero_grad(set_to_none=True)
                    m(*inputs).sample.float().square().mean().backward()

                outs[provider] = m(*inputs).sample.detach().float()
                ms = triton.testing.do_bench(step, warmup=3, rep=20)
                rows.append(dict(model=name, batch=n, dtype=args.dtype, provider=provider, ms=ms))
            diff = (outs["torch"] - outs["gn_triton"]).abs().max().item()
            for row in rows[-2:]:
                row["max_output_difference"] = diff
            print(f"{name} batch {n}: torch {rows[-2]['ms']:.2f} ms, gn_triton {rows[-1]['ms']:.2f} ms "
                  f"(x{rows[-2]['ms'] / rows[-1]['ms']:.2f}), max |output difference| {diff:.3g}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "model_bench.csv", index=False)
    print(f"wrote {args.out / 'model_bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
