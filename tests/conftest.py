"""Shared fixtures: offline hub, one cache for the whole session, small subject photo folders."""
from __future__ import annotations

import os
from pathlib import Path

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


TOKENIZER = Path(__file__).resolve().parents[1] / "dreambooth" / "assets" / "clip-tokenizer"


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory) -> Path:
    """A tiny random DINO (ViT) saved to a folder."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("tiny-dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP with the bundled tokenizer, saved to a folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The NaN tests run on either training step: the plain one, and the fast one as on CUDA (losses read a
# step late). A CUDA graph replays its step without running Python, so a patched loss would act only
# while it is captured: the fast step runs eagerly here.
STEP_KINDS = {"plain": ("dreambooth_loss", ["train.fast=never"]),
              "fast": ("split_loss", ["train.fast=always", "train.cuda_graph=false"])}


@pytest.fixture(params=list(STEP_KINDS))
def step_kind(request, monkeypatch):
    """(the name of its loss function, config overrides) of the training step a test runs; the fast
    one reads losses a step late."""
    from dreambooth.training import prepare

    if request.param == "fast":
        monkeypatch.setattr(prepare, "readout_lag", lambda fast, device: 1 if fast else 0)  # as on CUDA
    return STEP_KINDS[request.param]


@pytest.fixture
def poison_loss(monkeypatch):
    """`poison_loss(on_pred, on_parts)` wraps the loss of whichever training step runs: the plain
    step's (`dreambooth_loss` as training/step.py calls it) and the fast step's (`split_loss`).
    Each callback gets the call number (1 = the first step's loss) and the prediction or the loss
    parts, and returns them changed or not. Returns the names of the functions called, in order."""
    from dreambooth.training import fast, step

    calls = []

    def poison(on_pred=lambda n, pred: pred, on_parts=lambda n, parts: parts):
        for module, name in ((step, "dreambooth_loss"), (fast, "split_loss")):
            def wrapped(pred, target, *rest, real=getattr(module, name), name=name):
                calls.append(name)
                return on_parts(len(calls), real(on_pred(len(calls), pred), target, *rest))
            monkeypatch.setattr(module, name, wrapped)
        return calls
    return poison
