"""Shared fixtures: offline hub, one cache for the whole session, small subject photo folders."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DREAMBOOTH_NO_PROGRESS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Built-in tiny models and class images are built once per test session, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("dreambooth-cache")
    os.environ["DREAMBOOTH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """Five rendered photos of the toy world's dog subject, as a user would drop them in a folder."""
    from dreambooth.toyworld import render_subject

    folder = tmp_path_factory.mktemp("subject")
    for i, context in enumerate(["plain", "plain", "table", "plain", "city"]):
        render_subject("dog", context, seed=i).save(folder / f"dog{i}.png")
    return folder


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, subject_dir):
    """`train_run(name, preset, overrides)`: a 2-step run on the subject photos, its run directory."""
    def train_run(name: str, preset: str, overrides: list[str]):
        from dreambooth.config import load_config
        from dreambooth.training import train

        cfg = load_config(preset, {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                          ["train.steps=2", *overrides])
        run = tmp_path_factory.mktemp(name) / "run"
        train(cfg, run)
        return run
    return train_run


@pytest.fixture(scope="module")
def full_run(train_run):
    """A full fine-tune on the SD 1-style tiny model."""
    return train_run("full", "tiny", [])


@pytest.fixture(scope="module")
def full_run_v(train_run):
    """A full fine-tune on the SD 2-v-style tiny model (v-prediction)."""
    return train_run("full-v", "tiny", ["model.name=tiny-random-v"])
