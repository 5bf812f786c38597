"""Class-image cache: keyed by everything that made the images, resumable, never half-written."""
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dreambooth.priors import ClassImageKey, cached_class_images, class_image_folder, ensure_class_images

KEY = ClassImageKey(model="abc", prompt="a photo of a dog", negative_prompt="", sampler="dpmpp", steps=2,
                    guidance=7.5, resolution=8, seed=0)


class FakePipe:
    """Stands in for a diffusion pipeline: the image colour is a function of the seed."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after
        self._execution_device = torch.device("cpu")
        self.unet = self.vae = self.text_encoder = SimpleNamespace(dtype=torch.float32)

    def __call__(self, prompt, generator, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation
        self.calls.append(len(prompt))
        images = [Image.new("RGB", (8, 8), tuple(int(g.initial_seed() % 251) for _ in range(3))) for g in generator]
        return type("Out", (), {"images": images})


@pytest.mark.parametrize("field,value", [("model", "other"), ("prompt", "a photo of a cat"), ("negative_prompt", "blurry"),
                                         ("sampler", "ddim"), ("steps", 3), ("guidance", 5.0), ("resolution", 16),
                                         ("seed", 1)])
def test_every_field_changes_the_key(field, value):
    changed = ClassImageKey(**{**KEY.__dict__, field: value})
    assert changed.digest() != KEY.digest()


def test_generates_only_missing_images(tmp_path):
    pipe = FakePipe()
    first = ensure_class_images(KEY, 3, lambda: pipe, cache_dir=tmp_path, batch_size=2)
    assert [p.name for p in first] == ["00000.png", "00001.png", "00002.png"] and sum(pipe.calls) == 3
    more = FakePipe()
    paths = ensure_class_images(KEY, 5, lambda: more, cache_dir=tmp_path, batch_size=2)
    assert len(paths) == 5 and sum(more.calls) == 2  # only images 3 and 4 were made
    made = []
    ensure_class_images(KEY, 5, lambda: made.append(1), cache_dir=tmp_path)
    assert made == []  # nothing missing: the model is not even loaded


def test_images_of_another_key_are_never_reused(tmp_path):
    ensure_class_images(KEY, 2, lambda: FakePipe(), cache_dir=tmp_path)
    other = ClassImageKey(**{**KEY.__dict__, "prompt": "a photo of a cat"})
    assert cached_class_images(other, tmp_path) == []
    assert class_image_folder(other, tmp_path) != class_image_folder(KEY, tmp_path)
    pipe = FakePipe()
    ensure_class_images(other, 2, lambda: pipe, cache_dir=tmp_path)
    assert sum(pipe.calls) == 2


def test_killed_generation_resumes_to_the_same_images(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(KEY, 6, lambda: FakePipe(fail_after=1), cache_dir=tmp_path / "a", batch_size=2)
    folder = class_image_folder(KEY, tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"] == ["00000.png", "00001.png"]
    assert not list(folder.glob(".*tmp"))  # no half-written file left behind
    resumed = ensure_class_images(KEY, 6, lambda: FakePipe(), cache_dir=tmp_path / "a", batch_size=2)
    straight = ensure_class_images(KEY, 6, lambda: FakePipe(), cache_dir=tmp_path / "b", batch_size=3)
    for a, b in zip(resumed, straight):
        assert a.read_bytes() == b.read_bytes()


def test_image_seed_depends_on_index_and_seed():
    assert KEY.image_seed(0) != KEY.image_seed(1)
    assert ClassImageKey(**{**KEY.__dict__, "seed": 1}).image_seed(0) != KEY.image_seed(0)
