"""Fingerprints of subject photos: exact and near duplicates, and colourless (grayscale) sets.

Duplicates waste a slot of the 3-10 photos and overfit the model to one view; a set with no colour
teaches the model that the subject is gray. Both are warnings: the user may mean it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.errors import Problem

# Near duplicates need two measures to agree. Calibrated on the 30 subjects of google/dreambooth
# (342 distinct-photo pairs, 790 synthetic near duplicates: resized, JPEG q70, cropped 3 %,
# brightened 10 %, EXIF-rotated): no single hash separates them (distinct pairs reach 1 of 64
# dHash bits and 12 of 63 pHash bits; near duplicates reach 17 and 22), but no distinct pair is
# under both limits. benchmarks/duplicate_calibration.py measures it.
PHASH_SIZE = 8  # pHash: signs of the 8x8 lowest DCT frequencies (DC dropped) of a 32x32 thumbnail
NEAR_PHASH_BITS = 12  # at most this many of 63 bits differ ...
NEAR_STRUCTURE = 0.15  # ... and 1 - correlation of the 16x16 gray thumbnails is at most this
STRUCTURE_SIZE = 16
CHROMA_MIN = 16  # max(R,G,B) - min(R,G,B) above this counts as a coloured pixel
COLOURED_FRACTION = 0.005  # an image with fewer coloured pixels than this has no colour


@dataclass(frozen=True)
class Fingerprint:
    """What duplicate and colour checks need from one photo, computed once after EXIF turn."""

    path: Path | None
    sha256: str  # of the file bytes: exact duplicates
    phash: np.ndarray  # (63,) bool perceptual hash of the upright image: near duplicates
    structure: np.ndarray  # (256,) zero-mean unit-norm gray thumbnail (zeros for a flat image)
    colourless: bool


def fingerprint(path: Path, rgb: Image.Image) -> Fingerprint:
    """Fingerprint the upright RGB image `rgb` decoded from `path`."""
    return replace(image_fingerprint(rgb), path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def image_fingerprint(rgb: Image.Image) -> Fingerprint:
    """The pixel-based part of a fingerprint (no file: path None, empty sha256)."""
    return Fingerprint(path=None, sha256="", phash=perceptual_hash(rgb), structure=structure_vector(rgb),
                       colourless=is_colourless(rgb))


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """pHash (Zauner 2010): is each low DCT frequency of a 32x32 gray thumbnail above their median.

    It survives resizing, recompression and brightness changes, which is how near duplicates arise.
    """
    size = 4 * PHASH_SIZE
    gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    k = np.arange(size)
    dct = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size))  # DCT-II basis, (32, 32)
    low = (dct @ gray @ dct.T)[:PHASH_SIZE, :PHASH_SIZE].flatten()[1:]  # (63,), DC dropped
    return low > np.median(low)


def structure_vector(image: Image.Image) -> np.ndarray:
    """A 16x16 gray thumbnail, zero mean, unit norm: its dot product is the images' correlation."""
    size = (STRUCTURE_SIZE, STRUCTURE_SIZE)
    gray = np.asarray(image.convert("L").resize(size, Image.Resampling.BOX), dtype=np.float64).flatten()
    gray -= gray.mean()
    norm = np.linalg.norm(gray)
    return gray / norm if norm > 1e-6 else np.zeros_like(gray)  # flat: correlates with nothing


def distances(a: Fingerprint, b: Fingerprint) -> dict[str, float]:
    """pHash bits that differ, and 1 - correlation of the gray thumbnails (0 same .. 2 inverted)."""
    return {"phash_bits": int(np.count_nonzero(a.phash != b.phash)),
            "structure": float(1.0 - a.structure @ b.structure)}


def is_near_duplicate(d: dict[str, float]) -> bool:
    return d["phash_bits"] <= NEAR_PHASH_BITS and d["structure"] <= NEAR_STRUCTURE


def is_colourless(image: Image.Image) -> bool:
    """True when (almost) no pixel has colour, whatever the stored mode."""
    small = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.int16)
    chroma = small.max(axis=2) - small.min(axis=2)  # (64, 64)
    return float((chroma > CHROMA_MIN).mean()) < COLOURED_FRACTION


def duplicate_problems(prints: list[Fingerprint]) -> list[Problem]:
    """One warning per pair of files that are the same bytes or look the same."""
    problems = []
    for a, b in combinations(prints, 2):
        if a.sha256 == b.sha256:
            problems.append(Problem(str(b.path), f"is an exact duplicate of {a.path}; "
                                                 "remove one, it adds nothing but overfitting",
                                    "warning"))
            continue
        d = distances(a, b)
        if is_near_duplicate(d):
            problems.append(Problem(str(b.path), f"is a near duplicate of {a.path} ({d['phash_bits']} of 63 "
                                                 "hash bits differ); use photos with varied poses, "
                                                 "backgrounds and lighting", "warning"))
    return problems


def colour_problems(prints: list[Fingerprint], images_dir: Path) -> list[Problem]:
    """A warning when every photo is colourless (the model would learn a gray subject)."""
    if prints and all(p.colourless for p in prints):
        return [Problem(str(images_dir), f"all {len(prints)} images have no colour (grayscale, even "
                                         "if stored as RGB); generated images of the subject will "
                                         "tend to be gray too", "warning")]
    return []
