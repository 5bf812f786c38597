"""A line chart of checkpoint scores against training steps, drawn with Pillow.

matplotlib is not a dependency, and the chart is simple: three series (subject fidelity, prompt
fidelity, drift) on one axis, the limits as dashed lines, the chosen step marked.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from dreambooth.atomic import replace_file

SERIES: dict[str, tuple[str, tuple[int, int, int]]] = {  # row key -> (legend label, colour)
    "fidelity": ("subject fidelity", (31, 119, 180)),
    "prompt_fidelity": ("prompt fidelity", (44, 160, 44)),
    "drift": ("drift (lower is better)", (214, 39, 40)),
}
SIZE = (720, 420)
MARGIN = (64, 36, 180, 48)  # left, top, right (room for the legend), bottom
GRID_COLOUR = (225, 225, 225)
INK = (40, 40, 40)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], about `count` of them (1-2-5 steps)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _value_range(rows: Sequence[Mapping], limits: Sequence[float]) -> tuple[float, float]:
    """The y range: [0, 1] (shares and cosines), widened to any value outside it."""
    values = [float(r[k]) for r in rows for k in SERIES if r.get(k) is not None] + list(limits)
    return min([0.0, *values]), max([1.0, *values])


class _Axes:
    """Maps data (step, value) to pixels inside the plot area."""

    def __init__(self, steps: Sequence[float], y_ticks: Sequence[float]):
        self.x0, self.y0 = MARGIN[0], MARGIN[1]
        self.x1, self.y1 = SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
        self.s_lo, self.s_hi = min(steps), max(steps)
        if self.s_hi == self.s_lo:
            self.s_lo, self.s_hi = self.s_lo - 1, self.s_hi + 1
        self.v_lo, self.v_hi = y_ticks[0], y_ticks[-1]

    def point(self, step: float, value: float) -> tuple[float, float]:
        x = self.x0 + (step - self.s_lo) / (self.s_hi - self.s_lo) * (self.x1 - self.x0)
        y = self.y1 - (value - self.v_lo) / (self.v_hi - self.v_lo) * (self.y1 - self.y0)
        return x, y


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, *,
          align: tuple[float, float]) -> None:
    """Text placed so that `xy` is at fraction `align` of its box (0.5, 0.5: centred).

    Done by hand because Pillow's bitmap default font (Pillow < 10.1) does not take anchors.
    """
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - left - align[0] * (right - left)
    y = xy[1] - top - align[1] * (bottom - top)
    draw.text((x, y), text, fill=INK, font=font)


def _draw_frame(draw: ImageDraw.ImageDraw, axes: _Axes, steps: Sequence[int], y_ticks: Sequence[float],
                font: ImageFont.ImageFont) -> None:
    """Grid lines, tick labels, axis lines and axis titles."""
    for v in y_ticks:
        _, y = axes.point(axes.s_lo, v)
        draw.line([(axes.x0, y), (axes.x1, y)], fill=GRID_COLOUR)
        _text(draw, (axes.x0 - 6, y), f"{v:g}", font, align=(1.0, 0.5))
    for s in _nice_ticks(min(steps), max(steps), 6):
        if axes.s_lo <= s <= axes.s_hi:
            x, _ = axes.point(s, axes.v_lo)
            draw.line([(x, axes.y1), (x, axes.y1 + 4)], fill=INK)
            _text(draw, (x, axes.y1 + 6), f"{s:g}", font, align=(0.5, 0.0))
    draw.line([(axes.x0, axes.y0), (axes.x0, axes.y1), (axes.x1, axes.y1)], fill=INK, width=1)
    _text(draw, ((axes.x0 + axes.x1) / 2, SIZE[1] - 8), "training step", font, align=(0.5, 1.0))
    draw.text((8, axes.y0 - 20), "score", fill=INK, font=font)


def _dashed_hline(draw: ImageDraw.ImageDraw, axes: _Axes, value: float, colour, dash: int = 6) -> None:
    _, y = axes.point(axes.s_lo, value)
    for x in range(int(axes.x0), int(axes.x1), 2 * dash):
        draw.line([(x, y), (min(x + dash, axes.x1), y)], fill=colour, width=1)


def _draw_series(draw: ImageDraw.ImageDraw, axes: _Axes, rows: Sequence[Mapping]) -> None:
    """One polyline with dot markers per series; rows where the value is None are skipped."""
    for key, (_, colour) in SERIES.items():
        points = [axes.point(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _draw_legend(draw: ImageDraw.ImageDraw, rows: Sequence[Mapping], font: ImageFont.ImageFont,
                 extra: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    x, y = SIZE[0] - MARGIN[2] + 14, MARGIN[1]
    for key, (label, colour) in SERIES.items():
        measured = any(r.get(key) is not None for r in rows)
        draw.line([(x, y + 6), (x + 22, y + 6)], fill=colour, width=3)
        draw.text((x + 28, y), label if measured else f"{label}: not measured", fill=INK, font=font)
        y += 20
    for label, colour in extra:
        draw.line([(x, y + 6), (x + 6, y + 6)], fill=colour)
        draw.line([(x + 12, y + 6), (x + 18, y + 6)], fill=colour)
        draw.text((x + 28, y), label, fill=INK, font=font)
        y += 20


def plot_scores(rows: Sequence[Mapping], path: str | Path, *, chosen_step: int | None = None,
                min_prompt_fidelity: float | None = None, max_drift: float | None = None,
                title: str = "Checkpoint scores") -> Path:
    """Write a PNG line chart of fidelity, prompt fidelity and drift against step; return its path.

    rows are `score_checkpoint` rows (at least `step`; missing or None values leave gaps). The
    limits, when given, are drawn as dashed lines in the colour of their series, and the chosen
    step as a vertical line, so the chart shows why that step was chosen.
    """
    if not rows:
        raise ValueError("plot_scores needs at least one row")
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in rows]
    limits = [v for v in (min_prompt_fidelity, max_drift) if v is not None]
    y_ticks = _nice_ticks(*_value_range(rows, limits))
    font = ImageFont.load_default()
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    axes = _Axes(steps, y_ticks)
    _draw_frame(draw, axes, steps, y_ticks, font)
    extra = []
    if min_prompt_fidelity is not None:
        _dashed_hline(draw, axes, min_prompt_fidelity, SERIES["prompt_fidelity"][1])
        extra.append((f"min prompt fidelity {min_prompt_fidelity:g}", SERIES["prompt_fidelity"][1]))
    if max_drift is not None:
        _dashed_hline(draw, axes, max_drift, SERIES["drift"][1])
        extra.append((f"max drift {max_drift:g}", SERIES["drift"][1]))
    if chosen_step is not None:
        x, _ = axes.point(chosen_step, axes.v_lo)
        draw.line([(x, axes.y0), (x, axes.y1)], fill=(120, 120, 120), width=1)
        draw.text((x + 4, axes.y0 + 2), f"chosen: {chosen_step}", fill=INK, font=font)
    _draw_series(draw, axes, rows)
    _draw_legend(draw, rows, font, extra)
    draw.text((MARGIN[0], 10), title, fill=INK, font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(out, lambda tmp: image.save(tmp, format="PNG"))
