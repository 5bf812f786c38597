"""Subject images: validate a folder before any weights load, then turn photos into tensors.

`check_images` runs for `dreambooth check` and at the start of `train`. It reads every file,
collects every problem, and raises once (`ImageCheckError`) if any is an error, so a user with
three bad photos hears about all three at once.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.data.decode import (
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT,
    ImageRejected,
    aspect_message,
    aspect_ratio,
    decode_image,
    to_rgb,
)
from dreambooth.data.similarity import Fingerprint, colour_problems, duplicate_problems, fingerprint
from dreambooth.errors import ImageCheckError, Problem, raise_if_errors

MIN_IMAGES = 3  # Ruiz et al. use 3-5 photos; fewer rarely captures the subject
MAX_IMAGES = 20  # beyond this the method gains little and training overfits to the set
CROPS = ("center", "random")
SEVERITY_ORDER = ("error", "warning", "note")  # the report reads most urgent first
MASK_SUFFIX = ".mask.png"  # a subject mask beside its photo (data.masks=files), never a photo itself


@dataclass(frozen=True)
class SubjectImage:
    """One usable, validated photo."""

    path: Path
    width: int  # after EXIF orientation
    height: int
    mode: str  # original Pillow mode, before conversion to RGB
    exif_rotated: bool


@dataclass(frozen=True)
class ImageCheckReport:
    """The usable photos of a folder, and the warnings and notes found (errors raise instead)."""

    images: tuple[SubjectImage, ...]
    problems: tuple[Problem, ...]

    def summary(self) -> str:
        """Human-readable text for the CLI: a count line, then one line per problem."""
        counts = [f"{sum(p.severity == s for p in self.problems)} {s}(s)" for s in ("warning", "note")]
        lines = [f"{len(self.images)} usable image(s); {', '.join(counts)}"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_images(images_dir: str | Path, resolution: int = 512, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheckReport:
    """Validate every file in `images_dir` (not recursive) for training at `resolution`.

    Raises `ImageCheckError` listing all errors, and the warnings too, when any file is unusable
    or no file is usable. Otherwise returns the usable images with warnings and notes. Mask files
    (`<photo stem>.mask.png`, data/masks.py) are not photos and are passed over.
    """
    if resolution <= 0 or max_pixels <= 0:
        raise ValueError(f"resolution and max_pixels must be positive, got {resolution}, {max_pixels}")
    folder = Path(images_dir)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ImageCheckError(f"Cannot check subject images in {folder}", [
            Problem(str(folder), f"{what}; pass the folder that holds your 3-10 subject photos")])
    problems: list[Problem] = []
    images: list[SubjectImage] = []
    prints: list[Fingerprint] = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            problems.append(Problem(str(path), "is a folder; skipped (subfolders are not read)", "note"))
            continue
        if path.name.lower().endswith(MASK_SUFFIX):
            continue
        try:
            subject, rgb = _check_file(path, max_pixels)
        except ImageRejected as rejected:
            problems.append(rejected.problem)
            continue
        if (cover := cover_pixels(subject.width, subject.height, resolution)) > max_pixels:
            problems.append(Problem(str(path), f"would be {cover:,} pixels once resized to cover the "
                                               f"{resolution}x{resolution} training square, over the limit "
                                               f"of {max_pixels:,}; crop it closer to square"))
            continue
        images.append(subject)
        prints.append(fingerprint(path, rgb))
        if min(subject.width, subject.height) < resolution:
            problems.append(Problem(str(path), f"is {subject.width}x{subject.height}, smaller than the "
                                               f"training resolution {resolution}; it will be upscaled "
                                               "and look soft", "warning"))
    problems += _count_problems(len(images), folder)
    problems += duplicate_problems(prints)
    problems += colour_problems(prints, folder)
    problems.sort(key=lambda p: SEVERITY_ORDER.index(p.severity))  # stable: files stay in order
    errors = sum(p.severity == "error" for p in problems)
    raise_if_errors(f"Cannot use the subject images in {folder}: {errors} error(s)",
                    problems, ImageCheckError)
    return ImageCheckReport(tuple(images), tuple(problems))


def _check_file(path: Path, max_pixels: int) -> tuple[SubjectImage, Image.Image]:
    """Decode one file fully; raise `ImageRejected` if it cannot be used."""
    decoded = decode_image(path, max_pixels=max_pixels)
    width, height = decoded.image.size
    subject = SubjectImage(path, width, height, decoded.mode, decoded.exif_rotated)
    return subject, to_rgb(decoded.image)


def _count_problems(count: int, folder: Path) -> list[Problem]:
    """The set as a whole: none usable is an error, too few or too many a warning."""
    where = str(folder)
    if count == 0:
        return [Problem(where, "has no usable images; add 3-10 photos of your subject "
                               "(JPEG, PNG, WebP, ...)")]
    if count < MIN_IMAGES:
        return [Problem(where, f"has only {count} usable image(s); DreamBooth works best with "
                               f"{MIN_IMAGES}-10 photos of the subject", "warning")]
    if count > MAX_IMAGES:
        return [Problem(where, f"has {count} usable images, more than {MAX_IMAGES}; DreamBooth "
                               "needs 3-10, more mostly lengthens training and risks overfitting",
                        "warning")]
    return []


def load_rgb(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One photo, upright (EXIF applied), 8-bit RGB with alpha flattened on white.

    Raises `ImageCheckError` naming the file when it cannot be used.
    """
    try:
        return to_rgb(decode_image(Path(path), max_pixels=max_pixels).image)
    except ImageRejected as rejected:
        problem = rejected.problem
        if problem.severity != "error":  # skipping is for folders; a file asked for by name must load
            problem = Problem(problem.where, "is not an image Pillow can open")
        raise ImageCheckError(f"Cannot load {path}", [problem]) from None


def prepare_image(image: Image.Image, resolution: int, *, crop: str = "center", flip: bool = False,
                  rng: random.Random | None = None) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, optionally mirror; (3, R, R) in [-1, 1].

    The [-1, 1] range is what the Stable Diffusion VAE encoder expects. Random crops draw from
    `rng` only, so a seeded `rng` gives the same crops on every run (and on resume).
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    resized = resize_short_side(to_rgb(image), resolution)
    left, top = crop_offset(resized.size, resolution, crop, rng or random.Random())
    square = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(square, dtype=np.float32))  # (R, R, 3) in 0..255
    return pixels.permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R) in [-1, 1]


def cover_pixels(width: int, height: int, resolution: int) -> int:
    """Pixels of a width x height image after its short side is scaled to `resolution`."""
    return round(resolution * resolution * aspect_ratio(width, height))


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so that the shorter side equals `resolution`, keeping the aspect ratio.

    Refuses strips beyond MAX_ASPECT: their resize would allocate ratio x resolution^2 pixels.
    """
    width, height = image.size
    if aspect_ratio(width, height) > MAX_ASPECT:
        raise ValueError(f"image {aspect_message(width, height)}")
    size = resized_size(image.size, resolution)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of an image of `size` once `resize_short_side` scaled it to `resolution`."""
    width, height = size
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def crop_offset(size: tuple[int, int], resolution: int, crop: str,
                rng: random.Random) -> tuple[int, int]:
    """(left, top) of a `resolution` square inside `size`: centred (floor), or uniform at random."""
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "center":
        return spare_x // 2, spare_y // 2
    return rng.randint(0, spare_x), rng.randint(0, spare_y)
