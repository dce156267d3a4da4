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


# Per suite: (C, *spatial) of each layer, all with 32 groups.
_LAYERS: dict[str, list[tuple[int, ...]]] = {
    "sd_unet": [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)],  # Stable Diffusion U-Net
    "sd_vae": [(512, 64, 64), (512, 128, 128), (256, 256, 256), (128, 512, 512)],  # SD VAE decoder
    "resnet50_gn": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],  # ResNet-50 with GroupNorm
    "mask_rcnn_head": [(256, 200, 304)],  # Mask R-CNN GN head on a 200x304 feature map
    "video_vae": [(128, 20, 256, 256), (256, 10, 128, 128)],  # video VAE, 5-D (N, C, T, H, W)
    "llm_3d": [(4096, 2048), (1024, 8192)],  # LLM-style (N, C, L)
}
SUITES: dict[str, list[Shape]] = {
    suite: [Shape(suite, C, tuple(spatial)) for C, *spatial in layers] for suite, layers in _LAYERS.items()
}

# Tiny shapes for the functional sweep in Triton's interpreter (CPU, no GPU).
FUNCTIONAL_SUITES: dict[str, list[Shape]] = {
    "tiny": [Shape("tiny", 8, (8, 8), G=4), Shape("tiny", 16, (4, 4, 4), G=4), Shape("tiny", 12, (24,), G=3)],
}

BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SUITES = ("sd_unet", "sd_vae")
