"""Fingerprints of subject photos: exact and near duplicates, and colourless (grayscale) sets.

Duplicates waste a slot of the 3-10 photos and overfit the model to one view; a set with no colour
teaches the model that the subject is gray. Both are warnings: the user may mean it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.errors import Problem

HASH_SIZE = 8  # dHash on a (8, 9) grayscale thumbnail -> 64 bits
NEAR_HASH_BITS = 6  # at most this many of 64 bits differ for "near duplicate"
NEAR_COLOUR_DIFF = 12.0  # and the (8, 8) colour thumbnails differ by at most this, mean over 0..255
CHROMA_MIN = 16  # max(R,G,B) - min(R,G,B) above this counts as a coloured pixel
COLOURED_FRACTION = 0.005  # an image with fewer coloured pixels than this has no colour


@dataclass(frozen=True)
class Fingerprint:
    """What duplicate and colour checks need from one photo, computed once after EXIF turn."""

    path: Path
    sha256: str  # of the file bytes: exact duplicates
    dhash: int  # 64-bit difference hash of the upright image: near duplicates
    thumbnail: np.ndarray  # (8, 8, 3) float32 colour means, guards dHash on flat images
    colourless: bool


def fingerprint(path: Path, rgb: Image.Image) -> Fingerprint:
    """Fingerprint the upright RGB image `rgb` decoded from `path`."""
    return Fingerprint(
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        dhash=difference_hash(rgb),
        thumbnail=np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.float32),
        colourless=is_colourless(rgb),
    )


def difference_hash(image: Image.Image) -> int:
    """dHash (Krawetz 2013): one bit per horizontal neighbour pair of a (8, 9) gray thumbnail.

    It survives resizing and JPEG recompression, which is how near-duplicate photos arise.
    """
    gray = image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(gray, dtype=np.int16)  # (8, 9)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


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
        bits = bin(a.dhash ^ b.dhash).count("1")
        colour_diff = float(np.abs(a.thumbnail - b.thumbnail).mean())
        if bits <= NEAR_HASH_BITS and colour_diff <= NEAR_COLOUR_DIFF:
            problems.append(Problem(str(b.path), f"is a near duplicate of {a.path} ({bits} of 64 "
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
