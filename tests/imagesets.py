"""Small real image folders for tests: coloured shapes, one class per subfolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (("discs", (220, 40, 40)), ("squares", (40, 80, 220)), ("bars", (40, 170, 60)))


def shape_image(kind: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator):
    """One RGB image: a coloured shape of class ``kind`` at a random place on a light ground."""
    ground = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), ground)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "discs":
        draw.ellipse(box, fill=colour)
    elif kind == "squares":
        draw.rectangle(box, fill=colour)
    else:
        draw.rectangle((cx - r, 0, cx + r // 3, size), fill=colour)
    return img


def write_shapes(root: Path, per_class: int, size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/<k>.png``: ``per_class`` RGB images of ``size x size`` per class."""
    rng = np.random.default_rng(seed)
    for kind, colour in CLASSES:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shape_image(kind, colour, size, rng).save(folder / f"{k:03d}.png")
    return root
