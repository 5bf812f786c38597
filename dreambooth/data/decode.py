"""Open one subject photo safely: size limit from the header, full decode, EXIF turn, RGB.

Every failure becomes a `Problem` naming the file, so `check_images` can list all bad files at
once instead of crashing at step 1 of training.
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth.errors import Problem

DEFAULT_MAX_PIXELS = 64_000_000
# Panoramas run to about 4:1; beyond 8:1 a photo is a strip that a square crop cannot show, and
# resizing its short side up to the training resolution multiplies its pixels by the ratio.
MAX_ASPECT = 8.0
EXIF_ORIENTATION = 0x0112
# What Pillow's decoders raise on bad data; listed so that bugs elsewhere still surface.
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError)
WHITE = (255, 255, 255)


class ImageRejected(Exception):
    """A file cannot be used as a subject image; `problem` says why (error, or note for non-images)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded photo, upright, with what it was before conversion."""

    image: Image.Image  # upright (EXIF applied), original mode
    mode: str  # Pillow mode as stored in the file
    exif_rotated: bool  # True when the EXIF orientation changed the pixels


def image_extensions() -> frozenset[str]:
    """File suffixes Pillow registers (".jpg", ".png", ...), to tell corrupt images from other files."""
    Image.init()
    return frozenset(Image.registered_extensions())


def _open_header(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images over `max_pixels` before decoding them.

    Pillow's own bomb check uses a process-wide global; ours is per call. Pillow may still refuse
    first when an image is over twice its global limit, and we report that with our limit too.
    """
    _require_regular_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageRejected(Problem(str(path), _bomb_message(None, max_pixels)))
        except UnidentifiedImageError:
            raise ImageRejected(_not_an_image(path))
        except DECODE_ERRORS as exc:
            raise ImageRejected(Problem(str(path), f"cannot be read ({exc}); replace or remove it"))
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRejected(Problem(str(path), _bomb_message((width, height), max_pixels)))
    if aspect_ratio(width, height) > MAX_ASPECT:
        image.close()
        raise ImageRejected(Problem(str(path), aspect_message(width, height)))
    return image


def aspect_ratio(width: int, height: int) -> float:
    """Long side over short side; infinite for an image with no pixels."""
    return max(width, height) / min(width, height) if min(width, height) > 0 else float("inf")


def aspect_message(width: int, height: int) -> str:
    return (f"is {width}x{height}, a strip more than {MAX_ASPECT:g}:1 (long side over short side); refused, "
            "since covering the training square would need a huge resize. Crop it to the subject")


def _require_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices, sockets, folders and broken links before opening them.

    Opening a FIFO for reading blocks until a writer appears, in a system call that no signal
    handler interrupts, so `check` would hang forever. Links to regular files are followed.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        what = "a broken link (its target does not exist)" if os.path.islink(path) else "missing"
        raise ImageRejected(_unusable(path, what))
    except OSError as exc:
        raise ImageRejected(Problem(str(path), f"cannot be read ({exc}); replace or remove it"))
    if not stat.S_ISREG(mode):
        raise ImageRejected(_unusable(path, f"not a regular file but {_file_kind(mode)}"))


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _unusable(path: Path, what: str) -> Problem:
    """An error when the name promises an image, else a note: it is skipped like any non-image."""
    if path.suffix.lower() in image_extensions():
        return Problem(str(path), f"is {what}; it cannot be read as a photo. Replace it with the image file "
                                  "or remove it")
    return Problem(str(path), f"is {what}; skipped", "note")


def _bomb_message(size: tuple[int, int] | None, max_pixels: int) -> str:
    """Why an oversized image is refused and what to do; names the limit.

    Without a size, Pillow refused the header itself (over twice its global MAX_IMAGE_PIXELS);
    we then name whichever limit is lower, since that is the one the image broke.
    """
    if size:
        what = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or max_pixels)
        what, max_pixels = "is far too large", min(max_pixels, pillow_limit)
    advice = "Downscale it" + (", or raise max_pixels if you trust the file" if size else "")
    return f"{what}, over the limit of {max_pixels:,} pixels (possible decompression bomb); refused. {advice}"


def _not_an_image(path: Path) -> Problem:
    """A file Pillow cannot identify: corrupt if named like an image, else simply skipped."""
    if path.suffix.lower() in image_extensions():
        return Problem(str(path), f"is named {path.suffix} but is not a readable image (corrupt); "
                                  "replace or remove it")
    return Problem(str(path), "is not an image; skipped", "note")


def decode_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the whole file (to catch truncation now, not mid-training) and apply EXIF orientation."""
    image = _open_header(path, max_pixels)
    try:
        with image:
            image.load()
            mode = image.mode
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            upright = ImageOps.exif_transpose(image)  # always a copy, so closing `image` is safe
    except DECODE_ERRORS as exc:
        raise ImageRejected(Problem(str(path), f"is truncated or corrupt ({exc}); "
                                               "replace or remove it"))
    return DecodedImage(upright, mode, exif_rotated=orientation in range(2, 9))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with transparency flattened on white and high bit depths scaled, not clipped.

    Pillow's plain `convert("RGB")` clips 16-bit values at 255 (a mostly white photo) and drops
    alpha onto black; both would silently train on the wrong pixels.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float gray image to 8-bit "L".

    16-bit files are mapped 0..65535 -> 0..255; float images in [0, 1] are scaled by 255; "I"
    images that fit 8 bits are kept as they are.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
