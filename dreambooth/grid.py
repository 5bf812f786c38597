"""Contact sheets of images: used for validation samples, class images, galleries and reports."""
from __future__ import annotations

import math

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None, *, pad: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images row by row (all resized to the first one's size) with `pad` pixels between."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = image.convert("RGB")
        if tile.size != (w, h):
            tile = tile.resize((w, h), Image.Resampling.LANCZOS)
        sheet.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
