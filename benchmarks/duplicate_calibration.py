"""Calibrate the near-duplicate rule on real subject photos (google/dreambooth's dataset/).

    git --git-dir=<mirror of github.com/google/dreambooth> archive HEAD dataset | tar -x -C /tmp/db
    .venv/bin/python benchmarks/duplicate_calibration.py /tmp/db/dataset

For every subject folder it measures the fingerprint distances of (a) every pair of its distinct
photos and (b) every photo against synthetic near-duplicates of itself: resized to half, re-saved
as JPEG quality 70, cropped 3 % on each side, brightened 10 %, and an EXIF-rotated copy (decoded
upright, as `check` decodes it). It prints the distributions and how many pairs each candidate
rule flags. The photos are third-party data and are not part of the repository.
"""
from __future__ import annotations

import io
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from dreambooth.data.decode import decode_image, to_rgb
from dreambooth.data.similarity import distances, image_fingerprint, is_near_duplicate

EXIF_ORIENTATION = 0x0112


def upright(data: bytes, tmp: Path) -> Image.Image:
    tmp.write_bytes(data)
    return to_rgb(decode_image(tmp).image)


def jpeg(image: Image.Image, quality: int = 95, exif: Image.Exif | None = None) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


def near_duplicates(photo: Image.Image, tmp: Path) -> dict[str, Image.Image]:
    """The ways one photo reappears in a folder: each decoded the way `check` decodes files."""
    w, h = photo.size
    dx, dy = round(w * 0.03), round(h * 0.03)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored turned 90 degrees; viewers (and `check`) turn it back
    return {
        "resized-50%": upright(jpeg(photo.resize((w // 2, h // 2), Image.Resampling.LANCZOS)), tmp),
        "jpeg-q70": upright(jpeg(photo, 70), tmp),
        "crop-3%": upright(jpeg(photo.crop((dx, dy, w - dx, h - dy))), tmp),
        "brightness+10%": upright(jpeg(ImageEnhance.Brightness(photo).enhance(1.1)), tmp),
        "exif-rotated": upright(jpeg(photo.transpose(Image.Transpose.ROTATE_90), exif=exif), tmp),
    }


def measure(dataset: Path, tmp: Path):
    distinct, dups = [], []  # (subject, a, b, distances)
    for subject in sorted(p for p in dataset.iterdir() if p.is_dir()):
        photos = {p.name: to_rgb(decode_image(p).image) for p in sorted(subject.iterdir())
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        prints = {name: image_fingerprint(image) for name, image in photos.items()}
        for a, b in combinations(prints, 2):
            distinct.append((subject.name, a, b, distances(prints[a], prints[b])))
        for name, image in photos.items():
            for kind, copy in near_duplicates(image, tmp).items():
                dups.append((subject.name, name, kind, distances(prints[name], image_fingerprint(copy))))
    return distinct, dups


def describe(label: str, rows, key: str) -> str:
    values = np.array([r[3][key] for r in rows], dtype=float)
    q = np.percentile(values, [0, 1, 5, 50, 95, 99, 100])
    return (f"| {label} | {key} | {len(values)} | " + " | ".join(f"{v:.1f}" for v in q) + " |")


def main(dataset: Path) -> None:
    tmp = Path("/tmp/duplicate-calibration.jpg")
    distinct, dups = measure(dataset, tmp)
    keys = list(distinct[0][3])
    print("| pairs | distance | n | min | p1 | p5 | median | p95 | p99 | max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        print(describe("distinct photos", distinct, key))
        print(describe("near duplicates", dups, key))
    kinds = sorted({r[2] for r in dups})
    for kind in kinds:
        rows = [r for r in dups if r[2] == kind]
        print(f"{kind}: " + ", ".join(f"{k} max {max(r[3][k] for r in rows):.1f}" for k in keys))
    flagged = [r for r in distinct if is_near_duplicate(r[3])]
    missed = [r for r in dups if not is_near_duplicate(r[3])]
    print(f"rule: {len(flagged)} of {len(distinct)} distinct pairs flagged, "
          f"{len(missed)} of {len(dups)} near duplicates missed")
    for r in flagged + missed:
        print("  ", r[0], r[1], r[2], {k: round(v, 1) for k, v in r[3].items()})
    closest = sorted(distinct, key=lambda r: r[3][keys[0]])[:8]
    print("closest distinct pairs:", [(r[0], r[1], r[2], {k: round(v, 1) for k, v in r[3].items()}) for r in closest])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
