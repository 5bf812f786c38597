"""Class-image cache: keyed by everything that made the images, resumable, never half-written."""
import json
import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dreambooth.priors import (
    ClassImageKey,
    GenerationStopped,
    cached_class_images,
    class_image_folder,
    ensure_class_images,
)

KEY = ClassImageKey(model="abc", prompt="a photo of a dog", negative_prompt="", sampler="dpmpp", steps=2,
                    guidance=7.5, resolution=8, seed=0)


class FakeVAE:
    """Decodes a (B, 4, 2, 2) latent to 8x8 images whose colour is the latent's first value."""

    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=0.5)
    use_tiling = False

    def decode(self, latents, return_dict=False):
        return (latents[:, :3, :1, :1].expand(-1, 3, 8, 8) / 127.5 - 1,)


class FakePipe:
    """Stands in for a diffusion pipeline: the latent (and so the image colour) is a function of the seed."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after
        self._execution_device = torch.device("cpu")
        self.unet = self.text_encoder = SimpleNamespace(dtype=torch.float32)
        self.vae = FakeVAE()
        self.image_processor = SimpleNamespace(postprocess=lambda image, output_type: [
            Image.fromarray(((row.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for row in image])

    def __call__(self, prompt, generator, output_type="pil", **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation
        assert output_type == "latent"  # class images are kept as latents
        self.calls.append(len(prompt))
        latents = torch.stack([torch.full((4, 2, 2), float(g.initial_seed() % 251) * 0.5) for g in generator])
        return type("Out", (), {"images": latents})


@pytest.mark.parametrize("field,value", [("model", "other"), ("prompt", "a photo of a cat"),
                                         ("negative_prompt", "blurry"), ("sampler", "ddim"), ("steps", 3),
                                         ("guidance", 5.0), ("resolution", 16), ("seed", 1)])
def test_every_field_changes_the_key(field, value):
    changed = ClassImageKey(**{**KEY.__dict__, field: value})
    assert changed.digest() != KEY.digest()


def test_generates_only_missing_images(tmp_path):
    pipe = FakePipe()
    first = ensure_class_images(KEY, 3, lambda: pipe, cache_dir=tmp_path, batch_size=2)
    assert [p.name for p in first] == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    assert sum(pipe.calls) == 3
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
    assert manifest["latents"] == ["00000.safetensors", "00001.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == [  # no temporaries
        "00000.png", "00000.safetensors", "00001.png", "00001.safetensors", "manifest.json"]
    resumed = ensure_class_images(KEY, 6, lambda: FakePipe(), cache_dir=tmp_path / "a", batch_size=2)
    straight = ensure_class_images(KEY, 6, lambda: FakePipe(), cache_dir=tmp_path / "b", batch_size=3)
    for a, b in zip(resumed, straight):
        assert a.read_bytes() == b.read_bytes()


def test_image_seed_depends_on_index_and_seed():
    assert KEY.image_seed(0) != KEY.image_seed(1)
    assert ClassImageKey(**{**KEY.__dict__, "seed": 1}).image_seed(0) != KEY.image_seed(0)


class SteppingPipe(FakePipe):
    """Runs `num_inference_steps` steps and honours diffusers' interrupt flag and step callback."""

    def __init__(self, on_step=None):
        super().__init__()
        self.on_step, self.steps_run, self._interrupt = on_step, 0, False

    def __call__(self, prompt, generator, num_inference_steps, callback_on_step_end=None, **kwargs):
        self._interrupt = False  # as diffusers resets it at the start of every call
        for i in range(num_inference_steps):
            if self._interrupt:
                continue  # diffusers skips the remaining steps, then still decodes
            self.steps_run += 1
            if self.on_step:
                self.on_step(self.steps_run)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, i, {})
        return super().__call__(prompt, generator, **kwargs)


def test_priors_progress_is_reported_per_image(tmp_path):
    seen = []
    ensure_class_images(KEY, 3, lambda: FakePipe(), cache_dir=tmp_path, batch_size=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_priors_stop_between_batches_keeps_the_finished_images(tmp_path):
    stop = threading.Event()
    pipe = FakePipe()
    with pytest.raises(GenerationStopped) as caught:
        ensure_class_images(KEY, 6, lambda: pipe, cache_dir=tmp_path, batch_size=2, stop=stop,
                            progress=lambda done, total: stop.set() if done == 2 else None)
    assert (caught.value.done, caught.value.total) == (2, 6) and sum(pipe.calls) == 2
    assert [p.name for p in cached_class_images(KEY, tmp_path)] == ["00000.png", "00001.png"]
    rest = FakePipe()
    assert len(ensure_class_images(KEY, 6, lambda: rest, cache_dir=tmp_path, batch_size=2)) == 6
    assert sum(rest.calls) == 4  # the resumed generation makes only the missing ones


def test_priors_stop_within_a_batch_ends_the_denoising_loop(tmp_path):
    stop = threading.Event()
    pipe = SteppingPipe(on_step=lambda n: stop.set() if n == 3 else None)  # Cancel during step 3
    key = ClassImageKey(**{**KEY.__dict__, "steps": 50})
    with pytest.raises(GenerationStopped):
        ensure_class_images(key, 4, lambda: pipe, cache_dir=tmp_path, batch_size=4, stop=stop)
    assert pipe.steps_run == 3  # not 50: the step callback interrupted the pipeline
    assert cached_class_images(key, tmp_path) == []  # half-denoised images are not cached


def test_priors_training_stops_during_class_images(tmp_path, subject_dir):
    """The stop flag (Ctrl-C, SIGTERM, the web app's Cancel) ends a run in its class-image phase."""
    from dreambooth.config import load_config
    from dreambooth.training import events as ev
    from dreambooth.training import train_events

    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"},
                                  "prior": {"num_images": 6, "batch_size": 1, "cache": str(tmp_path / "cache")}},
                         ["train.steps=2"])
    stop = threading.Event()
    events = []
    for event in train_events(config, tmp_path / "run", stop=stop):
        events.append(event)
        if isinstance(event, ev.ClassImagesProgress) and event.done == 2:
            stop.set()
    assert [type(e) for e in events if not isinstance(e, ev.Notice)][-1] is ev.Stopped
    assert not any(isinstance(e, ev.Started) for e in events)
    progress = [(e.done, e.total) for e in events if isinstance(e, ev.ClassImagesProgress)]
    assert progress == [(0, 6), (1, 6), (2, 6)]
    assert len(list((tmp_path / "cache").glob("*/0000*.png"))) == 2  # kept for the next run
    resumed = list(train_events(config, tmp_path / "run", resume=True))
    assert [(e.done, e.total) for e in resumed if isinstance(e, ev.ClassImagesProgress)][0] == (2, 6)
    assert isinstance(resumed[-1], ev.Finished)


def test_class_images_are_kept_as_latents_with_png_previews_of_the_first(tmp_path):
    """Training takes each class image's latent as its target, so only the first `previews` are
    decoded; asking for more previews later decodes the kept latents without sampling again."""
    from dreambooth.priors import cached_class_latents, load_class_latent

    pipe = FakePipe()
    entries = ensure_class_images(KEY, 4, lambda: pipe, cache_dir=tmp_path, batch_size=3, previews=2)
    assert [p.name for p in cached_class_images(KEY, tmp_path)] == ["00000.png", "00001.png"]
    assert cached_class_latents(KEY, tmp_path) == entries
    latent = load_class_latent(entries[1])
    assert latent.shape == (4, 2, 2) and latent.dtype == torch.float32
    colour = Image.open(cached_class_images(KEY, tmp_path)[1]).getpixel((0, 0))
    assert colour == (round(float(latent[0, 0, 0]) / 0.5),) * 3  # the preview is that latent, decoded
    again = FakePipe()
    ensure_class_images(KEY, 4, lambda: again, cache_dir=tmp_path, batch_size=3, previews=4)
    assert again.calls == [] and len(cached_class_images(KEY, tmp_path)) == 4  # decoded, not sampled


def test_a_cache_of_pngs_from_before_latents_were_kept_is_still_used(tmp_path):
    """Older caches list PNGs only: those stay the entries (training encodes them), and images added
    to such a cache are kept as latents."""
    folder = class_image_folder(KEY, tmp_path)
    folder.mkdir(parents=True)
    for name in ("00000.png", "00001.png"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / name)
    (folder / "manifest.json").write_text(json.dumps({"key": KEY.__dict__, "images": ["00000.png", "00001.png"]}))
    pipe = FakePipe()
    entries = ensure_class_images(KEY, 3, lambda: pipe, cache_dir=tmp_path, previews=0)
    assert [p.name for p in entries] == ["00000.png", "00001.png", "00002.safetensors"] and pipe.calls == [1]


def test_class_source_takes_kept_latents_as_targets_and_encodes_older_pngs(tmp_path):
    """A kept latent is its image's target as it is, without posterior noise; its mirror is the
    latent mirrored. A PNG from an older cache is encoded with the VAE, as before."""
    from safetensors.torch import save_file

    from dreambooth.models import load_components
    from dreambooth.training.batches import FixedLatents, LatentSource, class_source, step_generator

    vae = load_components("tiny-random").vae
    latent = torch.randn(4, 8, 8)
    save_file({"latent": latent}, str(tmp_path / "00000.safetensors"))
    Image.new("RGB", (64, 64), (200, 30, 90)).save(tmp_path / "00001.png")
    mixed = class_source([tmp_path / "00000.safetensors", tmp_path / "00001.png"], vae, 64, cache=True)
    assert isinstance(mixed, FixedLatents) and len(mixed.images) == 2
    g = step_generator(0, 3)
    plain, ids, _ = mixed.latent(0, False, g)
    torch.testing.assert_close(plain, latent)
    torch.testing.assert_close(mixed.latent(0, True, g)[0], latent.flip(-1))
    assert ids.tolist() == [64, 64, 0, 0, 64, 64]
    png_only = class_source([tmp_path / "00001.png"], vae, 64, cache=True)
    assert type(png_only) is LatentSource
    a, b = mixed.latent(1, False, step_generator(0, 5)), png_only.latent(0, False, step_generator(0, 5))
    torch.testing.assert_close(a[0], b[0])  # the same posterior sample as the PNG-only source
