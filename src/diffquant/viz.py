"""Image grids for reports (Pillow only)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def make_grid(images: np.ndarray, nrow: Optional[int] = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (H', W', C) image with ``nrow`` images per row."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: Optional[int] = None, scale: int = 1) -> Path:
    from PIL import Image

    g = make_grid(images, nrow)
    img = Image.fromarray(g.squeeze(-1) if g.shape[-1] == 1 else g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_side_by_side(panels: Sequence[tuple[str, np.ndarray]], path: str | Path, nrow: Optional[int] = None,
                      scale: int = 2) -> Path:
    """Several grids (same seeds) next to each other, each with a caption above it."""
    from PIL import Image, ImageDraw

    grids = [Image.fromarray(make_grid(imgs, nrow)) for _, imgs in panels]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    cap, gap = 18, 12
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    height = max(g.height for g in grids) + cap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (title, _), g in zip(panels, grids):
        draw.text((x + 2, 2), title, fill="black")
        canvas.paste(g, (x, cap))
        x += g.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
