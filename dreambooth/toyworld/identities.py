"""Procedural identities: millions of individual toy-world subjects, each a pure function of a seed.

The four named ``SUBJECTS`` are too few to learn or test "is this the same individual?". An
``Identity`` fixes every look attribute the renderer varies (class, body colour, pattern and its
colour, spot count and layout, accessory and its colour); colours are drawn half from the named
palette and half as arbitrary "#rrggbb", so identities reach far beyond what captions can name.
Pose, size, position and context vary per view, as in a set of photos of one object.

Seed ranges are disjoint by purpose, so no number is ever tuned on the data it is tested on:
training 0-999,999 (the embedding), calibration 1,000,000-1,099,999 (rival identities for the
fidelity score's chance level and the drift decision), validation 1,100,000-1,199,999 (model-card figures), fresh
>= 2,000,000 (held-out test subjects).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dreambooth.toyworld.oracle import augment, to_tensor
from dreambooth.toyworld.render import (
    ACCESSORIES,
    ACCESSORY_COLORS,
    CLASSES,
    COLORS,
    CONTEXTS,
    PATTERN_COLORS,
    PATTERNS,
    SUBJECT_SPECS,
    Spec,
    random_spec,
    render,
    rgb,
)

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "calibration": (1_000_000, 1_100_000),
    "validation": (1_100_000, 1_200_000),
    "fresh": (2_000_000, 2**31 - 1),
}
MIN_CONTRAST = 90.0  # RGB distance below which a pattern or accessory would be hard to see


@dataclass(frozen=True)
class Identity:
    """One individual subject: ``look`` fixes every attribute but pose and context (which its
    views vary); ``key`` seeds its views (its seed, or a hash of a subject name)."""

    key: int
    look: Spec

    @property
    def class_name(self) -> str:
        return self.look.class_name

    def spec(self, rng: np.random.Generator, context: str = "plain") -> Spec:
        """This identity in ``context`` with a random pose, size and position (one "photo")."""
        return replace(self.look, context=context, facing=str(rng.choice(["left", "right"])),
                       size=float(rng.uniform(0.2, 1.0)), x=float(rng.random()), y=float(rng.random()))


def split_of(seed: int) -> str:
    """Which seed range ("train", "calibration", "validation", "fresh") a seed belongs to."""
    for name, (lo, hi) in SPLITS.items():
        if lo <= seed < hi:
            return name
    raise ValueError(f"identity seed {seed} is in no range: {SPLITS}")


def _hex(rng: np.random.Generator) -> str:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return f"#{r:02x}{g:02x}{b:02x}"


def _contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(rgb(a), rgb(b))))


def _colour_against(rng: np.random.Generator, body: str, named: Sequence[str]) -> str:
    """A colour (named half the time, else arbitrary) that stands out from the body colour."""
    while True:
        c = str(rng.choice(list(named))) if rng.random() < 0.5 else _hex(rng)
        if _contrast(c, body) >= MIN_CONTRAST:
            return c


def _check_class(class_name: str | None) -> None:
    if class_name is not None and class_name not in CLASSES:
        raise ValueError(f"unknown toy-world class {class_name!r}: use one of {', '.join(CLASSES)}")


def identity(seed: int, class_name: str | None = None) -> Identity:
    """The identity of ``seed`` (any split); ``class_name`` fixes the class, else the seed picks it."""
    split_of(seed)
    _check_class(class_name)
    rng = np.random.default_rng([seed, 17])
    chosen = str(rng.choice(list(CLASSES)))
    cls = class_name or chosen
    color = str(rng.choice(list(COLORS))) if rng.random() < 0.5 else _hex(rng)
    return Identity(seed, Spec(
        cls, "plain", color=color,
        pattern=str(rng.choice(PATTERNS, p=[0.4, 0.3, 0.3])),
        pattern_color=_colour_against(rng, color, PATTERN_COLORS),
        accessory=str(rng.choice(ACCESSORIES[cls], p=[0.4, 0.3, 0.3])),
        accessory_color=_colour_against(rng, color, ACCESSORY_COLORS),
        n_spots=int(rng.integers(2, 6)), pattern_seed=int(rng.integers(1 << 30)),
    ))


def identities(split: str, n: int, class_name: str | None = None, start: int = 0) -> list[Identity]:
    """``n`` identities of one seed range, seeds lo+start, lo+start+1, ... (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown identity split {split!r}: use one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    if start < 0 or lo + start + n > hi:
        raise ValueError(f"{n} identities from offset {start} do not fit the {split} range {lo}-{hi - 1}")
    return [identity(lo + start + i, class_name) for i in range(n)]


def fresh_identities(n: int, class_name: str | None = None) -> list[Identity]:
    """Held-out test subjects (seeds >= 2,000,000), never used for training or tuning."""
    return identities("fresh", n, class_name)


def from_spec(spec: Spec, key: int) -> Identity:
    """The identity a Spec depicts (its look, without pose and context)."""
    return Identity(key, replace(spec, context="plain", facing="right", size=0.5, x=0.5, y=0.5))


def subject_identity(name: str) -> Identity:
    """A built-in subject ("dog", "cat", "teapot", "backpack") as an Identity."""
    if name not in SUBJECT_SPECS:
        raise ValueError(f"unknown toy-world subject {name!r}: use one of {', '.join(SUBJECT_SPECS)}")
    return from_spec(SUBJECT_SPECS[name], zlib.crc32(name.encode()))


ID_PREFIX = "id:"  # a procedural identity by name: "id:2000003" is identity(2000003)


def named_identity(name: str) -> Identity | None:
    """The identity a subject name stands for: a built-in ("dog") or "id:<seed>"; None for any other
    name (a class noun, a subject known only from its photos)."""
    if name in SUBJECT_SPECS:
        return subject_identity(name)
    if not name.startswith(ID_PREFIX):
        return None
    seed = name[len(ID_PREFIX):]
    if not seed.isdigit():
        raise ValueError(f"{name!r}: a toy identity is named id:<seed>, the seed a whole number such as id:2000003")
    return identity(int(seed))


def random_fresh_name(rng: np.random.Generator) -> str:
    """A held-out identity picked at random (seeds >= 2,000,000, which no training or tuning used)."""
    lo, hi = SPLITS["fresh"]
    return f"{ID_PREFIX}{int(rng.integers(lo, min(hi, lo + 10_000_000)))}"


def describe_look(ident: Identity) -> str:
    """The look in words, e.g. "a #3a7bd5 dog with white spots and a red collar"."""
    look = ident.look
    extras = ([f"{look.pattern_color} {look.pattern}"] if look.pattern != "plain" else []) + (
        [_article(f"{look.accessory_color} {look.accessory}")] if look.accessory != "none" else [])
    return _article(f"{look.color} {look.class_name}") + (f" with {' and '.join(extras)}" if extras else "")


def _article(words: str) -> str:
    """ "an orange ball", "a #a448dc ball", "a white cup" """
    return ("an " if words[0] in "aeiou" else "a ") + words


def palette_rivals(class_name: str, k: int, seed: int = 0) -> list[Identity]:
    """``k`` calibration-range identities drawn the way the base model's training data draws
    objects (``random_spec``: named palette, never a subject look-alike): the dogs "a dog" is
    expected to produce. Rival i of ``seed`` has calibration seed 1,000,000 + 1000 * seed + i."""
    _check_class(class_name)
    if not 0 <= k <= 1000 or not 0 <= seed < 100:
        raise ValueError(f"palette_rivals takes k in 0..1000 and seed in 0..99, got {k}, {seed}")
    keys = [SPLITS["calibration"][0] + 1000 * seed + i for i in range(k)]
    return [from_spec(random_spec(np.random.default_rng([key, 29]), classes=[class_name]), key) for key in keys]


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(30, 90)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def degrade(images: Sequence[Image.Image], seed: int) -> list[Image.Image]:
    """The oracle's training degradations (blur, contrast, colour cast, noise; ``oracle.augment``)
    applied with a fixed seed, so calibration renders look as soft as generated images."""
    x = augment(to_tensor(images), torch.Generator().manual_seed(seed))
    arrays = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def render_views(ident: Identity, n: int, contexts: Sequence[str] = CONTEXTS, seed: int = 0, *,
                 jpeg: float = 0.3, soften: bool = True) -> list[Image.Image]:
    """``n`` photos of one identity in contexts drawn from ``contexts``, deterministic in ``seed``.

    As the oracle's training data: a share ``jpeg`` is JPEG-compressed (quality 30-90); with
    ``soften``, all are then degraded by ``degrade``. ``jpeg=0, soften=False`` gives clean renders.
    """
    unknown = [c for c in contexts if c not in CONTEXTS]
    if unknown or not contexts:
        raise ValueError(f"unknown toy-world contexts {unknown or '(none given)'}: use {', '.join(CONTEXTS)}")
    rng = np.random.default_rng([ident.key, seed, 41])
    views = []
    for _ in range(n):
        image = render(ident.spec(rng, str(rng.choice(list(contexts)))), rng)
        views.append(_jpeg(image, rng) if rng.random() < jpeg else image)
    return degrade(views, int(rng.integers(1 << 31))) if soften and views else views


def variant(ident: Identity, rng: np.random.Generator, key: int) -> Identity:
    """A near-twin of ``ident`` that differs in one look attribute: the hardest negative there is
    (the demo dog with a red collar instead of a blue one is another dog)."""
    look: dict[str, object] = {}
    kind = str(rng.choice(["color", "pattern", "pattern_color", "accessory", "accessory_color", "spots"]))
    if kind == "color":
        look["color"] = _colour_against(rng, ident.look.color, list(COLORS))
    elif kind == "pattern":
        look["pattern"] = str(rng.choice([p for p in PATTERNS if p != ident.look.pattern]))
    elif kind == "pattern_color" and ident.look.pattern != "plain":
        look["pattern_color"] = _colour_against(rng, ident.look.pattern_color, PATTERN_COLORS)
    elif kind == "accessory_color" and ident.look.accessory != "none":
        look["accessory_color"] = _colour_against(rng, ident.look.accessory_color, ACCESSORY_COLORS)
    elif kind == "spots" and ident.look.pattern == "spots":
        look["n_spots"] = int(rng.choice([n for n in range(2, 6) if n != ident.look.n_spots]))
        look["pattern_seed"] = int(rng.integers(1 << 30))
    else:  # accessory, or an attribute the identity does not show
        look["accessory"] = str(rng.choice([a for a in ACCESSORIES[ident.class_name] if a != ident.look.accessory]))
    return Identity(key, replace(ident.look, **look))  # type: ignore[arg-type]
