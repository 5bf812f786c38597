"""Grids and the evaluation report: the files exist, metrics.json round-trips, HTML is self-contained."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from dreambooth.evaluation.report import make_grid, safe_file_name, write_report
from dreambooth.evaluation.results import EvaluationResult, PromptScores

PROMPTS = ["a sks dog in the snow", "a sks dog wearing a <b>hat</b> / cape?"]


def tiles(n: int, size=(16, 12)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 0, 0)) for i in range(n)]


def test_make_grid_layout():
    grid = make_grid(tiles(5), cols=3, pad=2)
    assert grid.size == (3 * 16 + 4 * 2, 2 * 12 + 3 * 2)
    assert grid.getpixel((2 + 16 + 2 + 1, 3)) == (40, 0, 0)  # second cell
    assert make_grid(tiles(2), cols=8, pad=0).size == (32, 12)  # no empty columns
    odd = make_grid([Image.new("L", (16, 12)), Image.new("RGBA", (8, 8))], cols=2, pad=0)
    assert odd.mode == "RGB" and odd.size == (32, 12)
    with pytest.raises(ValueError):
        make_grid([], cols=2)


def test_safe_file_names_are_distinct_and_clean():
    names = {safe_file_name(p, i) for i, p in enumerate(PROMPTS)}
    assert len(names) == 2
    assert all(n.endswith(".png") and "/" not in n and "<" not in n for n in names)
    assert safe_file_name("x" * 300, 0).__len__() < 80
    assert safe_file_name("a/b", 0) != safe_file_name("a b", 0)


def result() -> EvaluationResult:
    rows = [PromptScores(PROMPTS[0], "a dog in the snow", 4, {"dino": 0.7, "div": 0.2, "clip_t": 0.3}),
            PromptScores(PROMPTS[1], "a dog wearing a hat", 1, {"dino": 0.5, "div": None, "clip_t": 0.2})]
    return EvaluationResult(overall={"dino": 0.66, "div": 0.2, "clip_t": 0.28, "pres": None},
                            per_prompt=rows, counts={"generated": 5, "real": 3, "class": 0, "prompts": 2},
                            extractors={"subject": "dino (tiny)", "clip": "clip (tiny)"},
                            notes=["div: not LPIPS"])


def test_write_report_files(tmp_path):
    grids = {PROMPTS[0]: make_grid(tiles(4), 2), PROMPTS[1]: make_grid(tiles(1), 2)}
    page = write_report(tmp_path / "eval", result(), grids, title="sks dog")
    out = tmp_path / "eval"
    assert page == out / "report.html"
    data = json.loads((out / "metrics.json").read_text())
    assert data["overall"]["dino"] == 0.66 and data["overall"]["pres"] is None
    assert data["counts"]["generated"] == 5 and data["extractors"]["subject"] == "dino (tiny)"
    assert "LPIPS" in data["definitions"]["div"]
    pngs = sorted((out / "grids").glob("*.png"))
    assert len(pngs) == 2
    assert sorted(data["grids"].values()) == [f"grids/{p.name}" for p in pngs]
    assert Image.open(pngs[0]).size == grids[PROMPTS[0]].size
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 2  # self-contained thumbnails
    assert "&lt;b&gt;hat&lt;/b&gt;" in text and "<b>hat</b>" not in text  # prompts escaped
    assert "a dog in the snow" in text and "not LPIPS" in text
    assert "<td>not measured</td>" in text and "n/a" not in text  # None reads as everywhere else


def test_write_report_accepts_dict_and_missing_grids(tmp_path):
    page = write_report(tmp_path, result().to_dict(), {})
    assert page.is_file() and json.loads((tmp_path / "metrics.json").read_text())["grids"] == {}
