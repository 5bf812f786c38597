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
