"""Evaluation outputs that describe themselves: metrics.json, one grid per prompt, report.html.

The HTML page is self-contained (thumbnails inlined as base64 PNG), so it can be mailed or
attached to an issue without its folder.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from dreambooth.atomic import replace_file, write_text
from dreambooth.evaluation.metrics import METRIC_DEFINITIONS
from dreambooth.evaluation.results import EvaluationResult, format_score
from dreambooth.sampling import make_grid as tile_images

THUMB_WIDTH = 512  # px width of the inlined grid thumbnails


def make_grid(images: Sequence[Image.Image], cols: int, *, pad: int = 4,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """`dreambooth.sampling.make_grid` with at most `cols` columns and never an empty column.

    A prompt with fewer images than `cols` gets a narrower grid, so the report's thumbnails
    carry no blank cells.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    return tile_images(list(images), min(cols, len(images)), pad=pad, background=background)


def safe_file_name(prompt: str, index: int, *, max_len: int = 60) -> str:
    """`03-a-sks-dog-in-the-snow-1a2b3c.png`: filesystem-safe, ordered, unique per prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].rstrip("-") or "prompt"
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:6]
    return f"{index:02d}-{slug}-{digest}.png"


def write_report(
    out_dir: Path | str,
    result: EvaluationResult | Mapping,
    grids_by_prompt: Mapping[str, Image.Image],
    *,
    title: str = "DreamBooth evaluation",
) -> Path:
    """Write metrics.json, grids/<prompt>.png and report.html into out_dir; return the HTML path.

    result is an `EvaluationResult` or its `to_dict()`; grids_by_prompt maps prompt -> grid image
    (see `make_grid`). Prompts without a grid get a row without a picture.
    """
    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    data = result.to_dict() if isinstance(result, EvaluationResult) else dict(result)
    grid_files = {}
    for i, (prompt, grid) in enumerate(grids_by_prompt.items()):
        name = safe_file_name(prompt, i)
        replace_file(out / "grids" / name, lambda tmp, grid=grid: grid.save(tmp, format="PNG"))
        grid_files[prompt] = f"grids/{name}"
    data["grids"] = grid_files
    write_text(out / "metrics.json", json.dumps(data, indent=2, allow_nan=False))
    return write_text(out / "report.html", render_html(data, grids_by_prompt, title=title))


def _thumbnail_uri(image: Image.Image) -> str:
    """A data: URI of the image scaled to THUMB_WIDTH, so the page needs no other file."""
    thumb = image.convert("RGB")
    if thumb.width > THUMB_WIDTH:
        thumb = thumb.resize((THUMB_WIDTH, round(thumb.height * THUMB_WIDTH / thumb.width)))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _overall_table(overall: Mapping[str, float | None]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{format_score(v)}</td>"
        f"<td>{html.escape(METRIC_DEFINITIONS.get(k, ''))}</td></tr>"
        for k, v in overall.items()
    )
    return f"<table><tr><th>metric</th><th>value</th><th>definition</th></tr>{rows}</table>"


def _prompt_note(row: Mapping) -> str:
    """What the prompt was judged against: the oracle's intended context, or CLIP-T's text."""
    if row.get("context"):
        return f"<br><small>intended context: {html.escape(row['context'])}</small>"
    if row.get("clip_prompt"):
        return f"<br><small>CLIP-T text: {html.escape(row['clip_prompt'])}</small>"
    return ""


def _prompt_table(per_prompt: Sequence[Mapping], grids: Mapping[str, Image.Image]) -> str:
    keys = list(dict.fromkeys(k for row in per_prompt for k in row["metrics"]))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for row in per_prompt:
        cells = "".join(f"<td>{format_score(row['metrics'].get(k))}</td>" for k in keys)
        grid = grids.get(row["prompt"])
        img = f'<img src="{_thumbnail_uri(grid)}" alt="grid">' if grid is not None else ""
        body.append(f"<tr><td>{html.escape(row['prompt'])}{_prompt_note(row)}</td>"
                    f"<td>{row['num_images']}</td>{cells}<td>{img}</td></tr>")
    return (f"<table><tr><th>prompt</th><th>images</th>{head}<th>samples</th></tr>"
            f"{''.join(body)}</table>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}img{max-width:512px}small{color:#555}"""


def _other_grids(per_prompt: Sequence[Mapping], grids: Mapping[str, Image.Image]) -> str:
    """Grids of prompts that have no score row, such as the plain class prompt behind PRES."""
    scored = {row["prompt"] for row in per_prompt}
    rest = [(p, g) for p, g in grids.items() if p not in scored]
    if not rest:
        return ""
    items = "".join(f"<h3>{html.escape(p)}</h3><img src=\"{_thumbnail_uri(g)}\" alt=\"grid\">"
                    for p, g in rest)
    return f"<h2>Other prompts (not scored per prompt)</h2>{items}"


def _settings_line(settings: Mapping) -> str:
    """One line on how the images were made, so the page can be reproduced."""
    if not settings:
        return ""
    text = ", ".join(f"{k}: {v}" for k, v in settings.items())
    return f"<p><small>Generation: {html.escape(text)}</small></p>"


def render_html(data: Mapping, grids: Mapping[str, Image.Image], *, title: str) -> str:
    """The one-page report: overall metrics with definitions, notes, then one row per prompt."""
    extractors = ", ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in data["extractors"].items())
    counts = ", ".join(f"{k}: {v}" for k, v in data["counts"].items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.get("notes", []))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Protocol: {html.escape(data.get('protocol', ''))}. Extractors: {extractors}. "
        f"Images: {counts}.</p>{_settings_line(data.get('settings', {}))}"
        f"<h2>Overall</h2>{_overall_table(data['overall'])}"
        f"<ul>{notes}</ul><h2>Per prompt</h2>{_prompt_table(data['per_prompt'], grids)}"
        f"{_other_grids(data['per_prompt'], grids)}</body></html>"
    )
