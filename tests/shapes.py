"""An easy image-folder set for the starter model: circles, squares and triangles of random
size, colour and place on a plain background of another random colour, as PNGs in
``<root>/<class>/`` (``circle``, ``square``, ``triangle``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def write_shapes(root: Path, per_class: int = 60, size: int = 32, seed: int = 0) -> Path:
    """Write ``per_class`` PNGs of ``size`` x ``size`` pixels per shape under ``root``; the same
    seed writes the same pictures. Each shape spans a third to nine tenths of the picture and
    differs from its background by at least 100 in some channel, so that a person sees it at a
    glance."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.integers(0, 256, 3)
            colour = rng.integers(0, 256, 3)
            while np.abs(colour - background).max() < 100:
                colour = rng.integers(0, 256, 3)
            side = int(rng.integers(size // 3, int(size * 0.9) + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            x1, y1 = x0 + side - 1, y0 + side - 1
            img = Image.new("RGB", (size, size), tuple(int(c) for c in background))
            draw = ImageDraw.Draw(img)
            fill = tuple(int(c) for c in colour)
            if name == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif name == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
            img.save(folder / f"{name}_{i:03d}.png")
    return root
