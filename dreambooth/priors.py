"""Class images for the prior-preservation loss, in a content-addressed cache.

Peers decide whether class images exist by counting files in a folder, so images made by another
model or prompt are silently reused. Here the folder name is a hash of everything that made the
images (model weights, prompt, negative prompt, sampler, steps, guidance, resolution, seed), a
manifest lists the finished ones, and image i is rendered from its own seed (seed, i): a killed
generation resumes where it stopped and produces exactly the images it would have.

Generation reports each finished image and stops, when asked, within one denoising step: a
stop flag (set by Ctrl-C, SIGTERM or the web app's Cancel) is checked between batches and by the
pipeline's step callback, and the images already finished stay in the cache.

Several processes of one run (`ranks.Ranks`) each make a disjoint share of the missing images into
the same folder; once all are on disk (a barrier) rank 0 alone writes the manifest.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from dreambooth.atomic import replace_file, write_json
from dreambooth.models import cache_root, model_identity
from dreambooth.models.vae import vae_folder
from dreambooth.prompts import fill_prompt
from dreambooth.ranks import Ranks
from dreambooth.sampling import sample_images

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ClassImageKey:
    model: str  # content hash of the base model (models.model_identity)
    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    guidance: float
    resolution: int
    seed: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def image_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + index) % (2**63)


def default_cache_dir() -> Path:
    return cache_root() / "class-images"


def class_image_folder(key: ClassImageKey, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / key.digest()[:24]


def cached_class_images(key: ClassImageKey, cache_dir: str | Path | None = None) -> list[Path]:
    """Images finished under exactly this key, in index order (none when the key differs)."""
    folder = class_image_folder(key, cache_dir)
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("key") != asdict(key):
        return []
    return [folder / name for name in manifest["images"] if (folder / name).exists()]


class GenerationStopped(Exception):
    """The stop flag ended class-image generation early; the finished images are cached."""

    def __init__(self, done: int, total: int):
        self.done, self.total = done, total
        super().__init__(f"class-image generation stopped after {done} of {total} images; "
                         "they are kept and the next run makes only the rest")


def ensure_class_images(
    key: ClassImageKey,
    num: int,
    make_pipe: Callable[[], object],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> list[Path]:
    """Return `num` class images for `key`, generating only the missing ones.

    `make_pipe` builds the sampling pipeline; it is called only when something is missing.
    `progress(done, total)` is called after every finished image. When `stop` is set, raises
    `GenerationStopped` once the current denoising step ends.
    """
    for done, total, paths in class_image_progress(key, num, make_pipe, cache_dir=cache_dir,
                                                    batch_size=batch_size, stop=stop):
        if progress:
            progress(done, total)
    if done < total:
        raise GenerationStopped(done, total)
    return paths


def class_image_progress(
    key: ClassImageKey,
    num: int,
    make_pipe: Callable[[], object],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 4,
    stop: threading.Event | None = None,
    ranks: Ranks = Ranks(),
) -> Iterator[tuple[int, int, list[Path]]]:
    """Yield (done, total, paths) first for the cached images, then after each new image.

    `paths` lists all `num` images only in the last tuple, when done == total; a set `stop`
    ends the iteration early (done < total), keeping every image finished so far. With several
    processes each makes `ranks.share` of the missing images (every process reads the same manifest
    first: nothing writes it before the barrier), then all meet, and the last tuple counts them all.
    """
    folder = class_image_folder(key, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    done = {p.name for p in cached_class_images(key, cache_dir)}
    todo = [i for i in range(num) if _name(i) not in done]
    everything = [folder / _name(i) for i in range(num)]
    yield num - len(todo), num, everything if not todo else []
    if ranks.count > 1:
        if todo:  # every process read the same manifest, so all of them skip this together
            yield from _shared_images(key, todo, done, everything, make_pipe, batch_size, stop, ranks)
        return
    finished = num - len(todo)
    for index in _make_images(key, todo, make_pipe, folder, batch_size, stop):
        done.add(_name(index))
        _write_manifest(folder, key, sorted(done))
        finished += 1
        yield finished, num, everything if finished == num else []


def _shared_images(key: ClassImageKey, todo: list[int], done: set[str], everything: list[Path], make_pipe,
                   batch_size: int, stop, ranks: Ranks) -> Iterator[tuple[int, int, list[Path]]]:
    """One of several processes: its share of `todo`, a barrier, then rank 0 writes the manifest.
    A stop ends this process's share early; it still meets the others at the barrier."""
    num, folder = len(everything), everything[0].parent
    finished = num - len(todo)
    for _ in _make_images(key, ranks.share(todo), make_pipe, folder, batch_size, stop):
        finished += 1
        yield finished, num, []
    ranks.wait()  # every share is on disk (or its process was stopped)
    made = done | {path.name for path in everything if path.exists()}  # written atomically: whole images
    if ranks.main:
        _write_manifest(folder, key, sorted(made))
    yield len(made), num, everything if len(made) == num else []


def _make_images(key: ClassImageKey, indices: list[int], make_pipe, folder: Path, batch_size: int,
                 stop) -> Iterator[int]:
    """Render and save the images of `indices`, yielding each index once its file is written."""
    pipe = make_pipe() if indices else None
    for start in range(0, len(indices), batch_size):
        if stop is not None and stop.is_set():
            return
        batch = indices[start : start + batch_size]
        images = sample_images(
            pipe, [key.prompt] * len(batch), [key.image_seed(i) for i in batch],
            steps=key.steps, guidance=key.guidance, resolution=key.resolution,
            negative_prompt=key.negative_prompt, batch_size=batch_size, stop=stop,
        )
        for index, image in zip(batch, images):  # fewer images than asked when stopped
            _save_png_atomically(image, folder / _name(index))
            yield index


def _name(index: int) -> str:
    return f"{index:05d}.png"


def _save_png_atomically(image, path: Path) -> None:
    replace_file(path, lambda tmp: image.save(tmp, format="PNG"))


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_manifest(folder: Path, key: ClassImageKey, names: list[str]) -> None:
    write_json(folder / MANIFEST, {"key": asdict(key), "images": names})


def class_image_key(model_folder: Path, config) -> ClassImageKey:
    """The cache key of the run's class images; needs the model's files, not its loaded weights.
    A VAE given in place of the model's (`model.vae`) decodes them, so its files count too."""
    prior, data = config.prior, config.data
    model = model_identity(model_folder)
    if config.model.vae:
        model += "+vae:" + model_identity(vae_folder(config.model.vae))
    return ClassImageKey(
        model=model, prompt=fill_prompt(data.class_prompt, data.identifier, data.class_noun),
        negative_prompt=prior.negative_prompt, sampler=prior.sampler, steps=prior.steps,
        guidance=prior.guidance, resolution=data.resolution, seed=prior.seed,
    )
