"""Shape suites from real models: the per-sample shape (C, *spatial) and G of GroupNorm layers that
users run at batch 1-64. Batch sizes are swept separately."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    suite: str
    C: int
    spatial: tuple[int, ...]
    G: int = 32

    def full(self, N: int) -> tuple[int, ...]:
        return (N, self.C, *self.spatial)

    @property
    def label(self) -> str:
        return f"C{self.C} {'x'.join(map(str, self.spatial)) or '-'} G{self.G}"


SUITES: dict[str, list[Shape]] = {
    # Stable Diffusion U-Net: C 320/640/1280 at 64², 32², 16², 8².
    "sd_unet": [
        Shape("sd_unet", 320, (64, 64)),
        Shape("sd_unet", 640, (32, 32)),
        Shape("sd_unet", 1280, (16, 16)),
        Shape("sd_unet", 1280, (8, 8)),
    ],
    # SD VAE decoder: C 512/512/256/128 at 64², 128², 256², 512².
    "sd_vae": [
        Shape("sd_vae", 512, (64, 64)),
        Shape("sd_vae", 512, (128, 128)),
        Shape("sd_vae", 256, (256, 256)),
        Shape("sd_vae", 128, (512, 512)),
    ],
    # ResNet-50 with GroupNorm: C 256...2048 at 56²...7².
    "resnet50_gn": [
        Shape("resnet50_gn", 256, (56, 56)),
        Shape("resnet50_gn", 512, (28, 28)),
        Shape("resnet50_gn", 1024, (14, 14)),
        Shape("resnet50_gn", 2048, (7, 7)),
    ],
    # Mask R-CNN GN head on a 200x304 feature map.
    "mask_rcnn_head": [Shape("mask_rcnn_head", 256, (200, 304))],
    # Video VAE, 5-D (N, C, T, H, W).
    "video_vae": [Shape("video_vae", 128, (20, 256, 256)), Shape("video_vae", 256, (10, 128, 128))],
    # LLM-style (N, C, L).
    "llm_3d": [Shape("llm_3d", 4096, (2048,)), Shape("llm_3d", 1024, (8192,))],
}

# Tiny shapes for the functional sweep in Triton's interpreter (CPU, no GPU).
FUNCTIONAL_SUITES: dict[str, list[Shape]] = {
    "tiny": [Shape("tiny", 8, (8, 8), G=4), Shape("tiny", 16, (4, 4, 4), G=4), Shape("tiny", 12, (24,), G=3)],
}

BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SUITES = ("sd_unet", "sd_vae")
