"""Backgrounds ("contexts") of the toy world, drawn procedurally with numpy and Pillow.

Each context has a look that a small CNN and a small diffusion model can tell apart at 64 px:
distinct colour layouts (sky/ground split, dominant hue) plus a few textures (stars, craters,
waves, leaves, windows, planks). Everything is drawn on a square canvas of side ``RENDER_SIZE``
(twice the output size) so that the final 2x box downsample anti-aliases the edges.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

RENDER_SIZE = 128  # drawing resolution; images are downsampled 2x to 64 px

Color = tuple[int, int, int]


def _vertical_gradient(top: Color, bottom: Color, height: int, width: int = RENDER_SIZE) -> np.ndarray:
    """(height, width, 3) uint8 gradient, the cheapest way to make skies and water look lit."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(rows, (height, width, 3)).astype(np.uint8)


def _jitter(color: Color, rng: np.random.Generator, amount: int = 12) -> Color:
    """Vary a base colour a little per image, so that no context is one exact RGB value."""
    c = np.asarray(color) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _split(sky: np.ndarray, ground: np.ndarray) -> Image.Image:
    """Stack a sky array above a ground array into one RGB canvas."""
    return Image.fromarray(np.concatenate([sky, ground], axis=0), "RGB")


def _horizon(rng: np.random.Generator, low: float = 0.45, high: float = 0.58) -> int:
    """Row of the horizon; varied so the model does not learn one fixed line."""
    return int(RENDER_SIZE * rng.uniform(low, high))


def draw_plain(rng: np.random.Generator) -> Image.Image:
    """Studio backdrop: a light, almost uniform colour (white, grey, cream or a pale pastel)."""
    base = [(240, 240, 240), (215, 215, 215), (245, 235, 215), (220, 230, 245), (235, 220, 230)]
    top = _jitter(base[rng.integers(len(base))], rng, 10)
    bottom = tuple(max(0, v - 25) for v in top)
    return Image.fromarray(_vertical_gradient(top, bottom, RENDER_SIZE).copy(), "RGB")


def draw_beach(rng: np.random.Generator) -> Image.Image:
    """Blue sky, a band of sea with white wave lines, pale sand with speckles."""
    h = _horizon(rng, 0.35, 0.45)
    sea = int(RENDER_SIZE * rng.uniform(0.12, 0.18))
    sky = _vertical_gradient(_jitter((110, 180, 240), rng), _jitter((190, 225, 250), rng), h)
    water = _vertical_gradient(_jitter((20, 110, 190), rng), _jitter((60, 160, 200), rng), sea)
    sand = _vertical_gradient(_jitter((240, 215, 160), rng), _jitter((220, 190, 130), rng), RENDER_SIZE - h - sea)
    img = Image.fromarray(np.concatenate([sky, water, sand], axis=0), "RGB")
    d = ImageDraw.Draw(img)
    if rng.random() < 0.6:
        x, y = rng.integers(10, 118), rng.integers(8, max(9, h - 12))
        d.ellipse((x - 9, y - 9, x + 9, y + 9), fill=(255, 235, 120))
    for _ in range(3):
        y = h + rng.integers(2, sea)
        x0 = rng.integers(0, 80)
        d.line((x0, y, x0 + rng.integers(20, 48), y), fill=(235, 245, 255), width=1)
    for _ in range(25):
        x, y = rng.integers(0, 128), rng.integers(h + sea, 128)
        d.point((int(x), int(y)), fill=(200, 170, 110))
    return img


def draw_moon(rng: np.random.Generator) -> Image.Image:
    """Black starry sky, grey dusty ground with darker craters, sometimes the Earth."""
    h = _horizon(rng, 0.45, 0.6)
    sky = np.zeros((h, RENDER_SIZE, 3), np.uint8) + np.uint8(rng.integers(0, 12))
    ground = _vertical_gradient(_jitter((150, 150, 150), rng), _jitter((95, 95, 100), rng), RENDER_SIZE - h)
    img = _split(sky, ground)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 35))):
        x, y = int(rng.integers(0, 128)), int(rng.integers(0, h))
        d.point((x, y), fill=(255, 255, 255))
    if rng.random() < 0.5:
        x, y, r = int(rng.integers(15, 113)), int(rng.integers(10, max(11, h - 15))), int(rng.integers(6, 11))
        d.ellipse((x - r, y - r, x + r, y + r), fill=(60, 120, 220))
        d.ellipse((x - r // 2, y - r // 2, x + r // 3, y + r // 3), fill=(70, 160, 90))
    for _ in range(int(rng.integers(3, 7))):
        x, y = int(rng.integers(0, 128)), int(rng.integers(h + 4, 128))
        rx, ry = int(rng.integers(5, 14)), int(rng.integers(2, 5))
        d.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(90, 90, 95), outline=(175, 175, 175))
    return img


def draw_snow(rng: np.random.Generator) -> Image.Image:
    """Pale grey-blue sky, white ground, dark pine trees behind and falling snowflakes."""
    h = _horizon(rng, 0.4, 0.55)
    sky = _vertical_gradient(_jitter((170, 185, 205), rng), _jitter((215, 225, 235), rng), h)
    ground = _vertical_gradient(_jitter((250, 250, 252), rng, 4), _jitter((220, 228, 240), rng, 6), RENDER_SIZE - h)
    img = _split(sky, ground)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x, tall = int(rng.integers(0, 128)), int(rng.integers(25, 45))
        d.polygon([(x - 10, h + 2), (x + 10, h + 2), (x, h + 2 - tall)], fill=_jitter((30, 80, 50), rng, 8))
        d.polygon([(x - 4, h - tall // 2), (x + 4, h - tall // 2), (x, h - tall + 4)], fill=(245, 245, 250))
    for _ in range(int(rng.integers(25, 45))):
        x, y = int(rng.integers(0, 128)), int(rng.integers(0, 128))
        d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 255))
    return img


def draw_jungle(rng: np.random.Generator) -> Image.Image:
    """Dense dark-green foliage of many leaves in several greens, hanging vines, dark soil."""
    h = _horizon(rng, 0.65, 0.75)
    sky = _vertical_gradient(_jitter((30, 70, 35), rng), _jitter((20, 55, 25), rng), h)
    ground = _vertical_gradient(_jitter((70, 60, 30), rng), _jitter((50, 40, 20), rng), RENDER_SIZE - h)
    img = _split(sky, ground)
    d = ImageDraw.Draw(img)
    greens = [(40, 120, 40), (70, 150, 50), (20, 90, 40), (100, 170, 60), (30, 140, 80)]
    for _ in range(int(rng.integers(35, 55))):
        x, y = int(rng.integers(-5, 133)), int(rng.integers(-5, h + 10))
        rx, ry = int(rng.integers(4, 12)), int(rng.integers(2, 6))
        d.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_jitter(greens[rng.integers(len(greens))], rng, 10))
    for _ in range(int(rng.integers(2, 5))):
        x = int(rng.integers(0, 128))
        d.line((x, 0, x + int(rng.integers(-8, 9)), int(rng.integers(30, 80))), fill=(90, 70, 30), width=2)
    return img


def draw_underwater(rng: np.random.Generator) -> Image.Image:
    """Blue water getting darker with depth, light rays, bubbles, seaweed on a sandy floor."""
    h = _horizon(rng, 0.78, 0.86)
    water = _vertical_gradient(_jitter((40, 150, 210), rng), _jitter((10, 50, 120), rng), h)
    floor = _vertical_gradient(_jitter((150, 140, 100), rng), _jitter((110, 100, 70), rng), RENDER_SIZE - h)
    img = _split(water, floor)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):
        x = int(rng.integers(0, 128))
        d.polygon([(x, 0), (x + 10, 0), (x + 30, h), (x + 22, h)], fill=_jitter((60, 165, 215), rng, 8))
    for _ in range(int(rng.integers(3, 6))):
        x, top = int(rng.integers(0, 128)), int(rng.integers(h - 45, h - 15))
        pts = [(x + (3 if i % 2 else -3), top + i * (h + 4 - top) // 6) for i in range(7)]
        d.line(pts, fill=_jitter((30, 130, 60), rng, 10), width=3)
    for _ in range(int(rng.integers(6, 14))):
        x, y, r = int(rng.integers(0, 128)), int(rng.integers(0, h)), int(rng.integers(1, 4))
        d.ellipse((x - r, y - r, x + r, y + r), outline=(200, 235, 255))
    return img


def draw_red_carpet(rng: np.random.Generator) -> Image.Image:
    """Dark backdrop with camera flashes, a red carpet running to the horizon, gold rope posts."""
    h = _horizon(rng, 0.42, 0.52)
    back = _vertical_gradient(_jitter((35, 10, 20), rng, 8), _jitter((15, 5, 10), rng, 5), h)
    floor = _vertical_gradient(_jitter((30, 25, 30), rng, 6), _jitter((20, 15, 20), rng, 6), RENDER_SIZE - h)
    img = _split(back, floor)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x, y, r = int(rng.integers(0, 128)), int(rng.integers(0, h)), int(rng.integers(1, 4))
        d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 250, 220))
    spread = int(rng.integers(0, 20))
    d.polygon([(40 - spread // 2, h), (88 + spread // 2, h), (128 + spread, 128), (-spread, 128)],
              fill=_jitter((190, 20, 35), rng, 12))
    for x0, x1 in ((30, 10), (98, 118)):
        d.line((x0, h, x1, 128), fill=(215, 175, 60), width=2)
    return img


def draw_city(rng: np.random.Generator) -> Image.Image:
    """Sky, grey buildings with rows of lit windows, sidewalk and asphalt with lane markings."""
    h = _horizon(rng, 0.5, 0.6)
    sky = _vertical_gradient(_jitter((150, 190, 225), rng), _jitter((200, 215, 230), rng), h)
    road = _vertical_gradient(_jitter((90, 90, 95), rng, 8), _jitter((60, 60, 65), rng, 8), RENDER_SIZE - h)
    img = _split(sky, road)
    d = ImageDraw.Draw(img)
    x = int(rng.integers(-10, 0))
    while x < 128:
        w, top = int(rng.integers(18, 34)), int(rng.integers(5, max(6, h - 20)))
        d.rectangle((x, top, x + w, h), fill=_jitter((120, 115, 125), rng, 25))
        for wy in range(top + 4, h - 4, 8):
            for wx in range(x + 3, x + w - 4, 7):
                d.rectangle((wx, wy, wx + 3, wy + 4), fill=(235, 225, 150) if rng.random() < 0.5 else (60, 70, 90))
        x += w + int(rng.integers(1, 5))
    d.rectangle((0, h, 128, h + 6), fill=_jitter((175, 170, 165), rng, 8))
    lane = h + (128 - h) * 2 // 3
    for lx in range(int(rng.integers(-12, 0)), 128, 24):
        d.rectangle((lx, lane, lx + 12, lane + 2), fill=(240, 220, 80))
    return img


def draw_table(rng: np.random.Generator) -> Image.Image:
    """Cream wall above a brown wooden table top made of planks with darker grain."""
    h = _horizon(rng, 0.38, 0.5)
    wall = _vertical_gradient(_jitter((235, 225, 200), rng, 10), _jitter((215, 200, 175), rng, 10), h)
    wood = _vertical_gradient(_jitter((165, 110, 60), rng, 12), _jitter((125, 80, 40), rng, 12), RENDER_SIZE - h)
    img = _split(wall, wood)
    d = ImageDraw.Draw(img)
    plank = int(rng.integers(14, 24))
    for y in range(h, 128, plank):
        d.line((0, y, 128, y), fill=(90, 55, 25), width=1)
    for _ in range(int(rng.integers(8, 16))):
        y, x0 = int(rng.integers(h + 2, 128)), int(rng.integers(-20, 110))
        d.line((x0, y, x0 + int(rng.integers(15, 45)), y + int(rng.integers(-1, 2))), fill=(115, 70, 35))
    return img


CONTEXT_PAINTERS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "plain": draw_plain,
    "beach": draw_beach,
    "moon": draw_moon,
    "snow": draw_snow,
    "jungle": draw_jungle,
    "underwater": draw_underwater,
    "red_carpet": draw_red_carpet,
    "city": draw_city,
    "table": draw_table,
}

# The row where the ground starts differs per context; objects stand a bit below it.
GROUND_LINE: dict[str, float] = {
    "plain": 0.6, "beach": 0.62, "moon": 0.62, "snow": 0.6, "jungle": 0.75,
    "underwater": 0.84, "red_carpet": 0.62, "city": 0.66, "table": 0.55,
}


def draw_context(context: str, rng: np.random.Generator) -> Image.Image:
    """Paint the background of ``context`` on a fresh RENDER_SIZE canvas."""
    return CONTEXT_PAINTERS[context](rng)
