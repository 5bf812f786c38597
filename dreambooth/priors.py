"""Class images for the prior-preservation loss, in a content-addressed cache.

Peers decide whether class images exist by counting files in a folder, so images made by another
model or prompt are silently reused. Here the folder name is a hash of everything that made the
images (model weights, prompt, negative prompt, sampler, steps, guidance, resolution, seed), a
manifest lists the finished ones, and image i is rendered from its own seed (seed, i): a killed
generation resumes where it stopped and produces exactly the images it would have.

Training needs only each class image's latent (its prior-loss target), so the cache keeps the
sampler's final latents (`00000.safetensors`, fp32) and decodes PNGs (`00000.png`) only as previews:
the first `PREVIEWS` of a training run, every one for `dreambooth priors`. No decode, PNG write and
VAE re-encode per image. Caches written before latents were kept (PNGs only) are still read: their
images are encoded at training time as before.

Generation reports each finished image and stops, when asked, within one denoising step: a
stop flag (set by Ctrl-C, SIGTERM or the web app's Cancel) is checked between batches and by the
pipeline's step callback, and the images already finished stay in the cache.

Several processes may want the same images at once (the runs of a batch share their class images):
one generates them under a per-key `flock` beside the folder, the others wait, reporting the images
it finishes, and then find them cached. No image is made twice and the manifest loses no entry.
The processes of one run on several devices (`ranks.Ranks`) instead each make a disjoint share of
the missing images into the same folder; once all are on disk (a barrier) rank 0 alone writes the
manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from dreambooth.atomic import replace_file, write_json
from dreambooth.models import cache_root, model_identity
from dreambooth.models.vae import vae_folder
from dreambooth.prompts import fill_prompt
from dreambooth.ranks import Ranks
from dreambooth.sampling import decode_latents, sample_images

MANIFEST = "manifest.json"
PREVIEWS = 8  # PNGs decoded per training run's class images, to look at (the demo shows 8)


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
    """PNGs (previews) finished under exactly this key, in index order (none when the key differs)."""
    folder = class_image_folder(key, cache_dir)
    return [folder / name for name in sorted(_Listed(folder, key).pngs)]  # names are zero-padded indices


def cached_class_latents(key: ClassImageKey, cache_dir: str | Path | None = None) -> list[Path]:
    """Latent files finished under exactly this key, in index order."""
    folder = class_image_folder(key, cache_dir)
    return [folder / name for name in sorted(_Listed(folder, key).latents)]


def load_class_latent(path: Path):
    """The (C, h, w) fp32 latent of one class image, in the UNet's scale."""
    from safetensors.torch import load_file

    return load_file(str(path))["latent"]


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
    previews: int = PREVIEWS,
) -> list[Path]:
    """Return the `num` class images' entries for `key` (see `class_image_progress`), generating
    only the missing ones.

    `make_pipe` builds the sampling pipeline; it is called only when something is missing.
    `progress(done, total)` is called after every finished image. When `stop` is set, raises
    `GenerationStopped` once the current denoising step ends.
    """
    for done, total, paths in class_image_progress(key, num, make_pipe, cache_dir=cache_dir,
                                                    batch_size=batch_size, stop=stop, previews=previews):
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
    previews: int = PREVIEWS,
    ranks: Ranks = Ranks(),
) -> Iterator[tuple[int, int, list[Path]]]:
    """Yield (done, total, entries) first for the cached images, then after each new image.

    `entries` lists all `num` images only in the last tuple, when done == total: for each index its
    latent file, or its PNG where an older cache has no latent. A set `stop` ends the iteration
    early (done < total), keeping every image finished so far. New images get a PNG preview when
    their index is below `previews`. With several processes each makes `ranks.share` of the missing
    images (every process reads the same manifest first: nothing writes it before the barrier),
    then all meet, and the last tuple counts them all.
    """
    folder = class_image_folder(key, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = _Listed(folder, key)
    missing = len(state.missing(num))
    yield num - missing, num, state.entries(num) if not missing else []
    if ranks.count > 1:
        if missing:  # every process read the same manifest, so all of them skip this together
            yield from _shared_images(key, num, state, make_pipe, batch_size, stop, previews, ranks)
        return
    if not missing and not state.unseen(num, previews):
        return
    with _KeyLock(folder.with_name(folder.name + ".lock")) as lock:
        while not lock.try_acquire():  # another process makes these images: report its progress
            if stop is not None and stop.is_set():
                return
            time.sleep(0.2)
            now = _Listed(folder, key)
            left = len(now.missing(num))
            if left < missing:
                missing = left
                yield num - missing, num, now.entries(num) if not missing else []
        yield from _generate(key, num, make_pipe, folder, batch_size, stop, previews)


class _Listed:
    """What the manifest of `folder` lists under `key` (nothing when it was made under another),
    and of that what exists: PNG and latent names."""

    def __init__(self, folder: Path, key: ClassImageKey):
        listed = _read_manifest(folder) or {}
        if listed.get("key") != asdict(key):
            listed = {}
        self.folder = folder
        self.pngs = {n for n in listed.get("images", []) if (folder / n).exists()}
        self.latents = {n for n in listed.get("latents", []) if (folder / n).exists()}

    def missing(self, num: int) -> list[int]:
        return [i for i in range(num) if _latent_name(i) not in self.latents and _name(i) not in self.pngs]

    def unseen(self, num: int, previews: int) -> list[int]:
        """Indices below `previews` whose latent is kept but not yet decoded to a PNG."""
        return [i for i in range(min(num, previews)) if _latent_name(i) in self.latents and _name(i) not in self.pngs]

    def entries(self, num: int) -> list[Path]:
        return [self.folder / (_latent_name(i) if _latent_name(i) in self.latents else _name(i)) for i in range(num)]

    def write(self, key: ClassImageKey) -> None:
        _write_manifest(self.folder, key, sorted(self.pngs), sorted(self.latents))


def _generate(key, num, make_pipe, folder: Path, batch_size: int, stop, previews: int):
    """The missing images (and previews asked for now of latents kept before), made while this
    process holds the key's lock."""
    state = _Listed(folder, key)  # read again: the lock's last holder made some
    todo, unseen = state.missing(num), state.unseen(num, previews)
    if not todo and not unseen:
        yield num, num, state.entries(num)
        return
    pipe = make_pipe()
    for start in range(0, len(unseen), batch_size):
        chunk = unseen[start : start + batch_size]
        _save_previews(key, pipe, state, chunk, [load_class_latent(folder / _latent_name(i)) for i in chunk])
        state.write(key)
    finished = num - len(todo)
    for _ in _make_images(key, todo, pipe, state, batch_size, stop, previews):
        state.write(key)
        finished += 1
        yield finished, num, state.entries(num) if finished == num else []


def _shared_images(key: ClassImageKey, num: int, state: _Listed, make_pipe, batch_size: int, stop, previews: int,
                   ranks: Ranks) -> Iterator[tuple[int, int, list[Path]]]:
    """One of several processes: its share of the missing images, a barrier, then rank 0 writes the
    manifest. A stop ends this process's share early; it still meets the others at the barrier."""
    todo = state.missing(num)
    mine = ranks.share(todo)
    finished = num - len(todo)
    for _ in _make_images(key, mine, make_pipe() if mine else None, state, batch_size, stop, previews):
        finished += 1
        yield finished, num, []
    ranks.wait()  # every share is on disk (or its process was stopped)
    folder = state.folder
    for i in range(num):  # written atomically: whole files
        for name, kept in ((_latent_name(i), state.latents), (_name(i), state.pngs)):
            if (folder / name).exists():
                kept.add(name)
    if ranks.main:
        state.write(key)
    missing = len(state.missing(num))
    yield num - missing, num, state.entries(num) if not missing else []


def _make_images(key: ClassImageKey, indices: list[int], pipe, state: _Listed, batch_size: int, stop,
                 previews: int) -> Iterator[int]:
    """Sample the images of `indices` and keep their latents (and PNG previews below `previews`),
    yielding each index once its latent is written."""
    folder = state.folder
    for start in range(0, len(indices), batch_size):
        if stop is not None and stop.is_set():
            return
        batch = indices[start : start + batch_size]
        made = sample_images(
            pipe, [key.prompt] * len(batch), [key.image_seed(i) for i in batch],
            steps=key.steps, guidance=key.guidance, resolution=key.resolution,
            negative_prompt=key.negative_prompt, batch_size=batch_size, stop=stop, latents=True,
        )
        for index, latent in zip(batch, made):  # fewer latents than asked when stopped
            _save_latent_atomically(latent, folder / _latent_name(index))
            state.latents.add(_latent_name(index))
        shown = [(i, z) for i, z in zip(batch, made) if i < previews]
        if shown:  # after the latents: a preview never stands without its latent
            _save_previews(key, pipe, state, *map(list, zip(*shown)))
        yield from batch[: len(made)]


def _save_previews(key: ClassImageKey, pipe, state: _Listed, indices: list[int], latents: list) -> None:
    """Decode the latents of `indices` and write them as their PNG previews."""
    for index, image in zip(indices, decode_latents(pipe, torch.stack(latents), key.resolution)):
        _save_png_atomically(image, state.folder / _name(index))
        state.pngs.add(_name(index))


class _KeyLock:
    """An exclusive `flock` on the cache key's lock file, taken without blocking so that a waiting
    process still sees the stop flag; the kernel drops it when its process ends, however it ends."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing the descriptor releases the flock


def _name(index: int) -> str:
    return f"{index:05d}.png"


def _latent_name(index: int) -> str:
    return f"{index:05d}.safetensors"


def _save_png_atomically(image, path: Path) -> None:
    replace_file(path, lambda tmp: image.save(tmp, format="PNG"))


def _save_latent_atomically(latent, path: Path) -> None:
    from safetensors.torch import save_file

    replace_file(path, lambda tmp: save_file({"latent": latent.contiguous()}, str(tmp)))


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_manifest(folder: Path, key: ClassImageKey, images: list[str], latents: list[str]) -> None:
    write_json(folder / MANIFEST, {"key": asdict(key), "images": images, "latents": latents})


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
