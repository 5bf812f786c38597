"""Silhouettes of the toy world's object classes, drawn on their own layer (colour + mask).

Every class is drawn facing right inside a unit square (coordinates in [0, 1]) on a layer of side
``LAYER``; the caller mirrors the layer for "facing left", scales it and pastes it on a context.
Silhouettes are chosen to be told apart by shape alone (dog: snout and floppy ear, cat: pointed
ears and upright tail, cup: tall with a ring handle, teapot: round with lid and spout, ball: disc,
backpack: rounded box with pocket and strap), because colour and pattern are free attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

LAYER = 96  # side of the object layer in render pixels
Color = tuple[int, int, int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Anatomy:
    """Where patterns and accessories go on a class, in unit coordinates."""

    torso: Box  # region covered by spots/stripes
    anchor: tuple[float, float]  # collar/bow position for animals, decal centre for objects
    stripes_vertical: bool


def _px(v: float) -> int:
    return int(round(v * LAYER))


def _box(b: Box) -> tuple[int, int, int, int]:
    return (_px(b[0]), _px(b[1]), _px(b[2]), _px(b[3]))


def _pts(points: list[tuple[float, float]]) -> list[tuple[int, int]]:
    return [(_px(x), _px(y)) for x, y in points]


def shade(color: Color, factor: float) -> Color:
    """Darker (factor < 1) or lighter (factor > 1) version of a colour, for parts and outlines."""
    if factor <= 1:
        return tuple(int(c * factor) for c in color)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * (factor - 1)) for c in color)  # type: ignore[return-value]


class Layer:
    """An RGB colour layer and its L mask, drawn together so they always agree."""

    def __init__(self) -> None:
        self.color = Image.new("RGB", (LAYER, LAYER))
        self.mask = Image.new("L", (LAYER, LAYER))
        self.dc = ImageDraw.Draw(self.color)
        self.dm = ImageDraw.Draw(self.mask)

    def ellipse(self, b: Box, fill: Color, width: float = 0.0) -> None:
        """Filled ellipse, or a ring of the given unit width (handles)."""
        if width:
            self.dc.ellipse(_box(b), outline=fill, width=_px(width))
            self.dm.ellipse(_box(b), outline=255, width=_px(width))
        else:
            self.dc.ellipse(_box(b), fill=fill)
            self.dm.ellipse(_box(b), fill=255)

    def polygon(self, pts: list[tuple[float, float]], fill: Color) -> None:
        self.dc.polygon(_pts(pts), fill=fill)
        self.dm.polygon(_pts(pts), fill=255)

    def rect(self, b: Box, fill: Color, radius: float = 0.0) -> None:
        self.dc.rounded_rectangle(_box(b), radius=_px(radius), fill=fill)
        self.dm.rounded_rectangle(_box(b), radius=_px(radius), fill=255)

    def line(self, pts: list[tuple[float, float]], fill: Color, width: float) -> None:
        self.dc.line(_pts(pts), fill=fill, width=_px(width), joint="curve")
        self.dm.line(_pts(pts), fill=255, width=_px(width), joint="curve")

    def dot(self, x: float, y: float, r: float, fill: Color) -> None:
        self.ellipse((x - r, y - r, x + r, y + r), fill)


BLACK: Color = (25, 25, 25)


def _dog(ly: Layer, c: Color) -> None:
    ly.line([(0.22, 0.45), (0.08, 0.27)], c, 0.055)
    for x in (0.24, 0.34, 0.58, 0.67):
        ly.rect((x, 0.52, x + 0.075, 0.9), c, 0.02)
    ly.ellipse((0.18, 0.35, 0.76, 0.65), c)
    ly.ellipse((0.62, 0.14, 0.9, 0.42), c)
    ly.ellipse((0.8, 0.27, 1.0, 0.42), c)


def _dog_details(ly: Layer, c: Color) -> None:
    ly.ellipse((0.62, 0.15, 0.73, 0.44), shade(c, 0.65))  # floppy ear
    ly.dot(0.81, 0.23, 0.025, BLACK)
    ly.dot(0.975, 0.31, 0.03, BLACK)


def _cat(ly: Layer, c: Color) -> None:
    ly.line([(0.27, 0.52), (0.12, 0.47), (0.07, 0.3), (0.1, 0.14)], c, 0.045)
    for x in (0.3, 0.38, 0.58, 0.66):
        ly.rect((x, 0.56, x + 0.055, 0.9), c, 0.02)
    ly.ellipse((0.25, 0.4, 0.75, 0.68), c)
    ly.polygon([(0.61, 0.3), (0.63, 0.06), (0.73, 0.22)], c)
    ly.polygon([(0.75, 0.22), (0.86, 0.06), (0.88, 0.3)], c)
    ly.ellipse((0.6, 0.18, 0.89, 0.46), c)


def _cat_details(ly: Layer, c: Color) -> None:
    for x in (0.69, 0.8):
        ly.dot(x, 0.3, 0.028, (150, 200, 60))
        ly.dot(x, 0.3, 0.012, BLACK)
    ly.polygon([(0.72, 0.36), (0.77, 0.36), (0.745, 0.39)], (230, 120, 140))
    for dy in (-0.03, 0.02):
        ly.line([(0.76, 0.39), (0.97, 0.39 + dy)], (90, 90, 90), 0.012)


def _cup(ly: Layer, c: Color) -> None:
    ly.ellipse((0.56, 0.38, 0.86, 0.72), c, width=0.075)
    ly.polygon([(0.22, 0.28), (0.7, 0.28), (0.66, 0.86), (0.26, 0.86)], c)
    ly.ellipse((0.22, 0.23, 0.7, 0.33), c)


def _cup_details(ly: Layer, c: Color) -> None:
    ly.ellipse((0.25, 0.245, 0.67, 0.315), (70, 40, 25))  # coffee seen from above


def _ball(ly: Layer, c: Color) -> None:
    ly.ellipse((0.2, 0.28, 0.8, 0.88), c)


def _ball_details(ly: Layer, c: Color) -> None:
    ly.ellipse((0.3, 0.36, 0.44, 0.46), shade(c, 1.6))  # specular highlight
    ly.dc.arc(_box((0.05, 0.3, 0.6, 0.95)), start=-60, end=60, fill=shade(c, 0.6), width=2)


def _backpack(ly: Layer, c: Color) -> None:
    ly.ellipse((0.4, 0.1, 0.6, 0.3), shade(c, 0.7), width=0.045)
    ly.rect((0.72, 0.34, 0.8, 0.82), shade(c, 0.6), 0.03)
    ly.rect((0.24, 0.2, 0.76, 0.88), c, 0.14)


def _backpack_details(ly: Layer, c: Color) -> None:
    ly.rect((0.32, 0.58, 0.68, 0.85), shade(c, 0.8), 0.06)
    ly.line([(0.33, 0.64), (0.67, 0.64)], shade(c, 0.45), 0.02)
    ly.line([(0.3, 0.3), (0.7, 0.3)], shade(c, 0.5), 0.02)


def _teapot(ly: Layer, c: Color) -> None:
    ly.ellipse((0.06, 0.42, 0.34, 0.74), c, width=0.065)
    ly.polygon([(0.66, 0.56), (0.72, 0.72), (0.97, 0.34), (0.9, 0.31)], c)
    ly.ellipse((0.2, 0.38, 0.8, 0.88), c)


def _teapot_details(ly: Layer, c: Color) -> None:
    ly.ellipse((0.35, 0.3, 0.65, 0.45), shade(c, 0.75))
    ly.ellipse((0.45, 0.21, 0.55, 0.32), shade(c, 0.6))


Painter = Callable[[Layer, Color], None]

CLASS_PAINTERS: dict[str, tuple[Painter, Painter, Anatomy]] = {
    "dog": (_dog, _dog_details, Anatomy((0.2, 0.36, 0.74, 0.64), (0.7, 0.42), True)),
    "cat": (_cat, _cat_details, Anatomy((0.27, 0.41, 0.74, 0.67), (0.68, 0.46), True)),
    "cup": (_cup, _cup_details, Anatomy((0.22, 0.34, 0.7, 0.86), (0.46, 0.58), False)),
    "ball": (_ball, _ball_details, Anatomy((0.2, 0.28, 0.8, 0.88), (0.56, 0.62), False)),
    "backpack": (_backpack, _backpack_details, Anatomy((0.24, 0.2, 0.76, 0.88), (0.5, 0.44), True)),
    "teapot": (_teapot, _teapot_details, Anatomy((0.22, 0.44, 0.78, 0.86), (0.5, 0.65), False)),
}


def _pattern_mask(kind: str, anatomy: Anatomy, pattern_seed: int, n_spots: int) -> Image.Image:
    """Mask of spots or stripes over the torso; spot layout comes from ``pattern_seed``."""
    pat = Image.new("L", (LAYER, LAYER))
    d = ImageDraw.Draw(pat)
    x0, y0, x1, y1 = anatomy.torso
    if kind == "spots":
        rng = np.random.default_rng(pattern_seed)
        for i in range(n_spots):
            # spread spots along the torso so that they do not merge into one blob
            cx = x0 + (x1 - x0) * (i + 0.5 + rng.uniform(-0.2, 0.2)) / n_spots
            cy = rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0))
            r = rng.uniform(0.05, 0.07)
            d.ellipse(_box((cx - r, cy - r, cx + r, cy + r)), fill=255)
    elif kind == "stripes":
        step = 0.11
        if anatomy.stripes_vertical:
            for x in np.arange(x0 + step / 2, x1, step):
                d.rectangle(_box((x, y0, x + 0.045, y1)), fill=255)
        else:
            for y in np.arange(y0 + step / 2, y1, step):
                d.rectangle(_box((x0, y, x1, y + 0.045)), fill=255)
    return pat


def _accessory(ly: Layer, kind: str, anchor: tuple[float, float], c: Color) -> None:
    """Collar, bandana or bow at an animal's neck; star or heart decal on an object."""
    ax, ay = anchor
    if kind == "collar":
        ly.polygon([(ax - 0.07, ay - 0.07), (ax + 0.01, ay - 0.1), (ax + 0.07, ay + 0.03), (ax - 0.01, ay + 0.06)], c)
        ly.dot(ax + 0.02, ay + 0.07, 0.025, (230, 200, 60))
    elif kind == "bandana":
        ly.polygon([(ax - 0.08, ay - 0.05), (ax + 0.09, ay), (ax - 0.01, ay + 0.16)], c)
    elif kind == "bow":
        ly.polygon([(ax, ay), (ax - 0.1, ay - 0.06), (ax - 0.1, ay + 0.06)], c)
        ly.polygon([(ax, ay), (ax + 0.1, ay - 0.06), (ax + 0.1, ay + 0.06)], c)
        ly.dot(ax, ay, 0.03, shade(c, 0.7))
    elif kind == "star":
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 0.12, 0.05)
        ly.polygon([(ax + r * np.cos(a), ay - r * np.sin(a)) for a, r in zip(ang, rad)], c)
    elif kind == "heart":
        ly.dot(ax - 0.045, ay - 0.03, 0.055, c)
        ly.dot(ax + 0.045, ay - 0.03, 0.055, c)
        ly.polygon([(ax - 0.1, ay - 0.015), (ax + 0.1, ay - 0.015), (ax, ay + 0.1)], c)


def draw_object(class_name: str, color: Color, pattern: str, pattern_color: Color, pattern_seed: int,
                n_spots: int, accessory: str, accessory_color: Color) -> tuple[Image.Image, Image.Image]:
    """(RGB, L mask) layer of one object facing right, with a dark outline baked in."""
    body, details, anatomy = CLASS_PAINTERS[class_name]
    ly = Layer()
    body(ly, color)
    if pattern != "plain":
        pat = ImageChops.multiply(_pattern_mask(pattern, anatomy, pattern_seed, n_spots), ly.mask)
        ly.color.paste(pattern_color, mask=pat)
    details(ly, color)
    if accessory != "none":
        _accessory(ly, accessory, anatomy.anchor, accessory_color)
    outline = ly.mask.filter(ImageFilter.MaxFilter(5))
    out = Image.new("RGB", (LAYER, LAYER), shade(color, 0.35))
    out.paste(ly.color, mask=ly.mask)
    return out, outline
