"""Subject masks for the masked loss (`data.masks`): where each photo's mask comes from, the checks
that run before any weights load, and the mask cut, mirrored and sized exactly as its photo is.

A mask is 8-bit greyscale, upright, the size of its photo: 255 on the subject, 0 on the background.
`alpha` takes it from the photo's own alpha channel; `files` from `<photo stem>.mask.png` beside
the photo (`check_images` never reads those as photos).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth.data.decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, to_rgb
from dreambooth.data.images import MASK_SUFFIX, SubjectImage, crop_offset, resize_short_side
from dreambooth.errors import ImageCheckError, Problem

ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def mask_file(photo: Path) -> Path:
    """Where `data.masks=files` looks for the mask of `photo`: dog1.jpg -> dog1.mask.png."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def read_mask(photo: Path, source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The mask of one photo, mode L, upright (EXIF applied as to the photo); raises
    `ImageRejected` naming the file and what to do when there is none."""
    if source == "alpha":
        image = decode_image(photo, max_pixels=max_pixels).image
        if image.mode not in ALPHA_MODES and "transparency" not in image.info:
            raise ImageRejected(Problem(str(photo), f"has no alpha channel ({image.mode}), which data.masks=alpha "
                                "reads as the subject mask: save it as a PNG or WebP whose background is "
                                f"transparent, or give a {photo.stem}{MASK_SUFFIX} beside it and set data.masks=files"))
        return image.convert("RGBA").getchannel("A")
    if source != "files":
        raise ValueError(f"mask source must be alpha or files, got {source!r}")
    path = mask_file(photo)
    if not path.is_file():
        raise ImageRejected(Problem(str(path), f"is missing: data.masks=files needs a mask of {photo.name} beside "
                                    "it, the photo's size, white on the subject and black elsewhere (or set "
                                    "data.masks=none)"))
    try:
        image = decode_image(path, max_pixels=max_pixels).image
    except ImageRejected as rejected:  # a .png that does not decode is unusable, never a note
        raise ImageRejected(Problem(str(path), f"cannot be read as the mask of {photo.name} "
                                    f"({rejected.problem.message}); save it again as a greyscale PNG")) from None
    return to_rgb(image).convert("L")


def check_masks(images: Sequence[SubjectImage], source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Every photo has a usable mask (present, readable, the photo's size, not empty; an alpha
    channel that is not all opaque); raise one `ImageCheckError` listing every bad one."""
    if source == "none":
        return
    problems = []
    for photo in images:
        try:
            mask = read_mask(photo.path, source, max_pixels=max_pixels)
        except ImageRejected as rejected:
            problems.append(rejected.problem)
            continue
        where = str(photo.path if source == "alpha" else mask_file(photo.path))
        low, high = mask.getextrema()
        if mask.size != (photo.width, photo.height):
            problems.append(Problem(where, f"is {mask.size[0]}x{mask.size[1]}, but its photo {photo.path.name} is "
                                           f"{photo.width}x{photo.height} (upright): make the mask the photo's size"))
        elif high == 0:
            problems.append(Problem(where, "is all black: it marks no subject; paint the subject white"))
        elif source == "alpha" and low == 255:
            problems.append(Problem(where, "has an alpha channel, but it is fully opaque, so it marks no "
                                           "background: make the background transparent, or use data.masks=files"))
    if problems:
        raise ImageCheckError(f"Cannot use the subject masks (data.masks={source}): {len(problems)} problem(s)",
                              problems)


def load_masks(images: Sequence[SubjectImage], source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> list[Image.Image] | None:
    """The masks of the photos in order (None for data.masks=none); `check_masks` has passed."""
    if source == "none":
        return None
    return [read_mask(photo.path, source, max_pixels=max_pixels) for photo in images]


def prepare_mask(mask: Image.Image, resolution: int, latent_size: tuple[int, int], *, crop: str = "center",
                 flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    """`prepare_image` for a mask, then area-averaged down to the latent grid: (1, h, w) fp32 in [0, 1].

    The same resize, crop offset (`rng` in the state the photo's crop used gives the same random
    crop) and mirror as the photo, so each latent cell's value is the subject's share of its pixels.
    """
    resized = resize_short_side(mask, resolution)
    left, top = crop_offset(resized.size, resolution, crop, rng or random.Random())
    square = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(square, dtype=np.float32)) / 255.0  # (R, R)
    return F.interpolate(pixels[None, None], size=latent_size, mode="area")[0]  # (1, h, w)
