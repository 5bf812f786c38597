"""Feature extractors: tiny random DINO/CLIP saved and loaded back by path; the real stand-in."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth.errors import ModelSourceError
from dreambooth.evaluation.features import (
    STANDIN_NAME,
    FeatureExtractor,
    TextImageExtractor,
    load_clip,
    load_dino,
    load_standin,
)
from dreambooth.evaluation.metrics import mean_pairwise_cosine


def random_images(n: int, seed: int = 0, size=(40, 30)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            for _ in range(n)]


def assert_normalised(x: torch.Tensor, n: int, d: int) -> None:
    assert x.shape == (n, d)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(n))


def test_dino_loads_from_folder(tiny_dino_dir):
    dino = load_dino(tiny_dino_dir)
    assert isinstance(dino, FeatureExtractor) and dino.kind == "dino"
    assert str(tiny_dino_dir) in dino.name
    images = random_images(3)
    emb = dino.embed_images(images + [images[0].convert("L").convert("RGB")])
    assert_normalised(emb, 4, 32)
    assert mean_pairwise_cosine(dino.embed_images(images[:1]), dino.embed_images(images[:1])) == \
        pytest.approx(1.0, abs=1e-6)


def test_dino_uses_cls_token(tiny_dino_dir):
    dino = load_dino(tiny_dino_dir)
    pixels = dino.preprocess(random_images(2))
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.embed_images(random_images(2)),
                               torch.nn.functional.normalize(cls, dim=-1))


def test_clip_loads_from_folder_and_matches_model_embeddings(tiny_clip_dir):
    clip = load_clip(tiny_clip_dir)
    assert isinstance(clip, TextImageExtractor) and clip.kind == "clip"
    images = random_images(2, seed=1)
    img = clip.embed_images(images)
    txt = clip.embed_texts(["a dog on the moon", "a dog"])
    assert_normalised(img, 2, 16)
    assert_normalised(txt, 2, 16)
    # CLIPModel's forward returns normalised projected embeddings: ours must be the same.
    tokens = clip.tokenizer(["a dog on the moon", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(pixel_values=clip.preprocess(images), **tokens)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=1e-5)


def test_missing_folder_and_offline_hub_id_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="DINO") as err:
        load_dino(tmp_path / "no-such-folder")
    assert "no such model folder" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as err:
        load_dino("dreambooth-tests/no-such-model")
    text = str(err.value)
    assert "dreambooth-tests/no-such-model" in text and "local folder" in text
    assert "stand-in" in text
    with pytest.raises(ModelSourceError, match="CLIP"):
        load_clip(tmp_path)  # a folder without a model in it


def scene(seed: int) -> Image.Image:
    """A 320x320 picture of random coloured shapes: structure for a CNN to recognise."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (320, 320), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.integers(0, 280, 2)
        w, h = rng.integers(20, 120, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    return im


def test_standin_loads_real_weights_offline_and_sees_the_same_image():
    standin = load_standin()
    assert standin.name == STANDIN_NAME and standin.kind == "standin"
    a, b = scene(1), scene(2)
    crops = [a.crop((0, 0, 280, 280)), a.crop((40, 40, 320, 320))]
    emb = standin.embed_images(crops + [b])
    assert_normalised(emb, 3, 1280)
    same = mean_pairwise_cosine(emb[:1], emb[1:2])
    unrelated = mean_pairwise_cosine(emb[:1], emb[2:])
    assert same > unrelated + 0.05, (same, unrelated)
    assert mean_pairwise_cosine(emb[:1], standin.embed_images(crops[:1])) == pytest.approx(1.0, abs=1e-5)


def test_standin_missing_weights_file(tmp_path):
    with pytest.raises(ModelSourceError, match="stand-in"):
        load_standin(tmp_path / "missing.pth")


def test_score_images_with_tiny_models_end_to_end(tiny_dino_dir, tiny_clip_dir, tmp_path):
    from dreambooth.evaluation import make_grid, score_images, write_report

    real = random_images(3, seed=5)
    generated = {"a sks dog in the snow": real[:2], "a red sks dog": random_images(2, seed=6)}
    result = score_images(generated, real, random_images(2, seed=7),
                          subject_extractor=load_dino(tiny_dino_dir), clip=load_clip(tiny_clip_dir),
                          identifier="sks", class_noun="dog")
    assert {"dino", "clip_i", "clip_t", "pres", "div", "dino_real_images"} <= set(result.overall)
    assert result.per_prompt[0].metrics["dino"] > result.per_prompt[1].metrics["dino"]
    page = write_report(tmp_path, result, {p: make_grid(ims, 2) for p, ims in generated.items()})
    assert page.is_file() and (tmp_path / "metrics.json").is_file()
