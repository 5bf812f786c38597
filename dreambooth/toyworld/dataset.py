"""Render labelled toy-world datasets in bulk, in parallel, into numpy arrays.

Pretraining needs hundreds of thousands of images in seconds; one process draws about a thousand
per second, so chunks are spread over a process pool. Each chunk has its own seed, which makes a
dataset a pure function of (kind, n, seed) whatever the number of workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image

from dreambooth.toyworld.render import CLASSES, CONTEXTS, SUBJECTS, caption, identity_of, random_spec, render

ORACLE_CLASSES: tuple[str, ...] = CLASSES + ("none",)
IDENTITIES: tuple[str, ...] = tuple(SUBJECTS) + ("other",)
CHUNK = 500


@dataclass
class RenderedSet:
    """Images (N, 64, 64, 3) uint8, two captions per image and integer labels for the oracle heads."""

    images: np.ndarray
    captions: list[tuple[str, str]]
    class_ids: np.ndarray  # index into ORACLE_CLASSES
    context_ids: np.ndarray  # index into CONTEXTS
    identity_ids: np.ndarray  # index into IDENTITIES


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Round-trip through JPEG at a random quality: the oracle must not rely on clean edges."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(30, 90)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _render_chunk(args: tuple[str, int, int]) -> RenderedSet:
    """Render one chunk. kind "diffusion": random instances (3% empty scenes), never subjects.
    kind "oracle": adds 12% empty scenes and 30% named subjects, and JPEG-compresses 30% of images."""
    kind, n, seed = args
    rng = np.random.default_rng(seed)
    images, captions, cls, ctx, ident = [], [], [], [], []
    for _ in range(n):
        u = rng.random()
        if kind == "oracle" and u < 0.3:
            spec = SUBJECTS[str(rng.choice(list(SUBJECTS)))](rng, str(rng.choice(CONTEXTS)))
        elif u > (0.88 if kind == "oracle" else 0.97):
            spec = random_spec(rng, classes=["none"])
        else:
            spec = random_spec(rng)
        image = render(spec, rng)
        if kind == "oracle" and rng.random() < 0.3:
            image = _jpeg(image, rng)
        images.append(np.asarray(image))
        captions.append((caption(spec, rng), caption(spec, rng)))
        cls.append(ORACLE_CLASSES.index(spec.class_name))
        ctx.append(CONTEXTS.index(spec.context))
        ident.append(IDENTITIES.index(identity_of(spec)))
    return RenderedSet(np.stack(images), captions, np.array(cls), np.array(ctx), np.array(ident))


def _concat(parts: list[RenderedSet]) -> RenderedSet:
    return RenderedSet(
        np.concatenate([p.images for p in parts]), [c for p in parts for c in p.captions],
        np.concatenate([p.class_ids for p in parts]), np.concatenate([p.context_ids for p in parts]),
        np.concatenate([p.identity_ids for p in parts]),
    )


def render_dataset(kind: str, n: int, seed: int, workers: int = 1) -> RenderedSet:
    """``n`` labelled images of ``kind`` ("diffusion" or "oracle"), deterministic in ``seed``."""
    sizes = [min(CHUNK, n - i) for i in range(0, n, CHUNK)]
    jobs = [(kind, size, seed * 100_003 + i) for i, size in enumerate(sizes)]
    if workers <= 1:
        return _concat([_render_chunk(j) for j in jobs])
    with get_context("fork").Pool(workers) as pool:
        return _concat(pool.map(_render_chunk, jobs, chunksize=1))
