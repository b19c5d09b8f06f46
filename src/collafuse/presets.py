"""U-Net sizes by image size: the site's and the server's default models.

A federation that does not name its models gets the preset of its images' larger side
(:func:`preset_for`). Each level after the first halves the resolution; attention follows the
residual blocks at the 16x16 and 8x8 levels of the server's model (8x8 only at the site,
whose model is the cheap one), except at 28/32 pixels where the presets are the models the
published Fashion-MNIST results were measured with (no attention). Parameters and training
FLOPs per preset: docs/presets.md (``python scripts/model_presets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from collafuse.unet import UNetSpec


@dataclass(frozen=True)
class Preset:
    """The default site and server U-Nets for images up to ``max_size`` pixels a side."""

    name: str
    max_size: int
    site: UNetSpec
    server: UNetSpec


PRESETS: tuple[Preset, ...] = (
    Preset(
        "32",
        32,
        site=UNetSpec(16, (1, 2, 2)),
        server=UNetSpec(32, (1, 2, 2)),
    ),
    Preset(
        "64",
        64,
        site=UNetSpec(16, (1, 2, 2, 2), attention_levels=(3,)),
        server=UNetSpec(32, (1, 2, 2, 2), attention_levels=(2, 3)),
    ),
    Preset(
        "128",
        128,
        site=UNetSpec(16, (1, 1, 2, 2, 2), attention_levels=(4,)),
        server=UNetSpec(32, (1, 1, 2, 2, 4), attention_levels=(3, 4)),
    ),
    Preset(
        "256",
        256,
        site=UNetSpec(16, (1, 1, 2, 2, 2, 2), attention_levels=(5,)),
        server=UNetSpec(32, (1, 1, 2, 2, 4, 4), attention_levels=(4, 5)),
    ),
)


def preset_for(image_shape: tuple[int, ...]) -> Preset:
    """The preset for images ``(C, H, W)``: the smallest whose ``max_size`` covers both sides
    (the largest beyond 256; name your models in the config there)."""
    side = max(int(image_shape[-2]), int(image_shape[-1]))
    return next((p for p in PRESETS if side <= p.max_size), PRESETS[-1])
