"""`evaluate` end to end on a 2-step tiny-random run: library call, CLI, and the offline errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_eval_oracle import FakeOracle

from dreambooth.cli import main
from dreambooth.evaluation.command import evaluate_run
from dreambooth.evaluation.scorers import load_extractors

PROMPTS = "# two prompts\na {identifier} {class} on the beach\na red {identifier} {class}\n"


@pytest.fixture(scope="module")
def tiny_run(subject_dir, tmp_path_factory) -> Path:
    from dreambooth.config import load_config
    from dreambooth.training import train

    cfg = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                      ["train.steps=2"])
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train(cfg, run)
    return run


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_evaluate_run_with_oracle_reports_toy_metrics(tiny_run, subject_dir, tmp_path):
    out = tmp_path / "toy"
    evaluate_run(tiny_run, subject_dir, "sks", "dog", out, prompts=["a photo of {identifier} "
                 "{class} on the moon", "a {identifier} {class}, watercolour"], num_per_prompt=2,
                 steps=2, oracle=FakeOracle(identity="dog", context="moon"))
    data = read_metrics(out)
    overall = data["overall"]
    # the identity embedding sees the 2-step tiny-random model's noise as far from the dog (4 images:
    # 2-core CPU under 0.2, H200 in bf16 0.29); the fake oracle's closed-set head says "dog" for every image
    assert overall["subject_fidelity"] <= 0.5 and overall["language_drift"] == 0.0
    assert overall["subject_identity_oracle"] == 1.0
    assert overall["prompt_fidelity"] == 1.0  # only the moon prompt names a context
    assert [r["context"] for r in data["per_prompt"]] == ["moon", None]
    assert data["per_prompt"][1]["metrics"]["prompt_fidelity"] is None
    assert data["extractors"]["subject"] == "toy-world oracle"
    assert "intended context: moon" in (out / "report.html").read_text()


def test_cli_evaluate_writes_metrics_grids_and_report(tiny_run, subject_dir, prompt_file,
                                                      tiny_dino_dir, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_run), "--images", str(subject_dir),
                 "--identifier", "sks", "--class-noun", "dog", "--output", str(out),
                 "--prompts", str(prompt_file), "--num-per-prompt", "2", "--steps", "2",
                 "--dino", str(tiny_dino_dir), "--clip", str(tiny_clip_dir)])
    assert code == 0
    assert "report.html" in capsys.readouterr().out
    data = read_metrics(out)
    assert {"dino", "clip_i", "clip_t", "pres", "div", "dino_real_images",
            "clip_i_real_images"} <= set(data["overall"])
    assert all(isinstance(data["overall"][k], float) for k in ("dino", "clip_t", "pres"))
    assert data["counts"] == {"generated": 4, "real": 5, "class": 2, "prompts": 2}
    assert [r["prompt"] for r in data["per_prompt"]] == ["a sks dog on the beach", "a red sks dog"]
    assert [r["clip_prompt"] for r in data["per_prompt"]] == ["a dog on the beach", "a red dog"]
    assert all(r["num_images"] == 2 for r in data["per_prompt"])
    assert data["settings"]["steps"] == 2 and data["settings"]["num_per_prompt"] == 2
    assert str(tiny_dino_dir) in data["extractors"]["subject"]
    assert set(data["grids"]) == {"a sks dog on the beach", "a red sks dog", "a dog"}
    for rel in data["grids"].values():
        assert Image.open(out / rel).size == (2 * 64 + 3 * 4, 64 + 2 * 4)  # 2 images of 64 px
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "a red sks dog" in page


def test_cli_evaluate_fails_clearly_without_dino_offline(tiny_run, subject_dir, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["evaluate", "--model", str(tiny_run), "--images", str(subject_dir),
                 "--identifier", "sks", "--class-noun", "dog", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0
    assert "facebook/dino-vits16" in err and "stand-in" in err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_cli_evaluate_standin_records_clip_as_not_measured(tiny_run, subject_dir, prompt_file,
                                                           tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "standin"
    code = main(["evaluate", "--model", str(tiny_run), "--images", str(subject_dir),
                 "--identifier", "sks", "--class-noun", "dog", "--output", str(out),
                 "--prompts", str(prompt_file), "--num-per-prompt", "2", "--steps", "2", "--standin"])
    assert code == 0, capsys.readouterr().err
    data = read_metrics(out)
    overall = data["overall"]
    assert overall["clip_i"] is None and overall["clip_t"] is None
    assert isinstance(overall["subject_similarity_standin"], float) and "dino" not in overall
    assert "stand-in" in data["extractors"]["subject"]
    assert any("CLIP could not be loaded" in n and "openai/clip-vit-base-patch32" in n
               for n in data["notes"])


def test_bad_prompt_file_fails_before_any_model_loads(subject_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a {class} without the subject\n")
    loaded = []
    with pytest.raises(Exception, match="no \\{identifier\\}"):
        evaluate_run("no-such-model", subject_dir, "sks", "dog", tmp_path / "o", prompts=bad,
                     extractors=lambda: loaded.append(1) or load_extractors(standin=True))
    assert loaded == []


def test_library_code_does_not_import_the_evaluate_command():
    """The command's orchestration (the module defining evaluate_run) is for the CLI only: importing
    the evaluation package or training must not load it."""
    code = ("import sys, dreambooth.evaluation, dreambooth.training, dreambooth.training.scoring; "
            "print([n for n, m in list(sys.modules.items()) "
            "if n.startswith('dreambooth') and hasattr(m, 'evaluate_run')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
