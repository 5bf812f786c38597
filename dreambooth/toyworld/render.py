"""The toy world: seeded procedural "photos" of objects in contexts, with prompt-style captions.

A ``Spec`` fixes everything about one picture's subject (class, colour, pattern, accessory, pose,
size, position, context); ``render`` draws it (context details come from the ``rng`` passed in).
``SUBJECTS`` are the named identities that DreamBooth demos personalise; their attribute
combinations never occur in ``random_spec`` output, so the base model has never seen them, just as
a real base model has never seen a user's own dog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from dreambooth.toyworld.objects import CLASS_PAINTERS, LAYER, draw_object
from dreambooth.toyworld.scenes import CONTEXT_PAINTERS, GROUND_LINE, RENDER_SIZE, draw_context

IMAGE_SIZE = 64  # output resolution; drawn at 128 and box-downsampled 2x for anti-aliasing

CLASSES: tuple[str, ...] = tuple(CLASS_PAINTERS)  # dog, cat, cup, ball, backpack, teapot
CONTEXTS: tuple[str, ...] = tuple(CONTEXT_PAINTERS)  # plain first, then eight scenes
SCENES: tuple[str, ...] = tuple(c for c in CONTEXTS if c != "plain")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40), "blue": (40, 85, 205), "green": (45, 150, 60), "yellow": (240, 205, 40),
    "orange": (240, 130, 30), "purple": (130, 60, 175), "pink": (240, 145, 185),
    "brown": (135, 82, 40), "black": (40, 40, 40), "white": (245, 245, 245), "grey": (145, 145, 150),
}
PATTERNS: tuple[str, ...] = ("plain", "spots", "stripes")


def rgb(color: str) -> tuple[int, int, int]:
    """A palette name ("brown") or an arbitrary "#rrggbb" colour as an RGB triple."""
    if color in COLORS:
        return COLORS[color]
    if re.fullmatch(r"#[0-9a-fA-F]{6}", color):
        return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))
    raise ValueError(f"unknown toy-world colour {color!r}: use one of {', '.join(COLORS)} or '#rrggbb'")


PATTERN_COLORS: tuple[str, ...] = ("white", "black")
ACCESSORY_COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "pink", "purple")
ACCESSORIES: dict[str, tuple[str, ...]] = {
    "dog": ("none", "collar", "bandana"), "cat": ("none", "collar", "bow"),
    "cup": ("none", "star", "heart"), "ball": ("none", "star", "heart"),
    "backpack": ("none", "star", "heart"), "teapot": ("none", "star", "heart"),
}

CONTEXT_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("on a plain background", "on a white background", "in a studio"),
    "beach": ("on the beach", "at the beach", "on a sandy beach"),
    "moon": ("on the moon", "on the surface of the moon"),
    "snow": ("in the snow", "on the snow", "in a snowy forest"),
    "jungle": ("in the jungle", "in a jungle", "in the rainforest"),
    "underwater": ("under water", "underwater", "at the bottom of the sea"),
    "red_carpet": ("on a red carpet", "on the red carpet"),
    "city": ("in a city street", "on a city street", "in the city"),
    "table": ("on a wooden table", "on a table", "on top of a wooden table"),
}


@dataclass(frozen=True)
class Spec:
    """Everything that determines one rendered subject; ``class_name="none"`` draws no object.

    Colours are palette names or "#rrggbb" (procedural identities use both; see identities.py).
    """

    class_name: str
    context: str
    color: str = "brown"
    pattern: str = "plain"
    pattern_color: str = "white"
    accessory: str = "none"
    accessory_color: str = "red"
    n_spots: int = 3
    pattern_seed: int = 0
    facing: str = "right"  # "left" mirrors the silhouette
    size: float = 0.5  # 0..1, maps to 45%..80% of the image side
    x: float = 0.5  # 0..1, horizontal position within the free range
    y: float = 0.5  # 0..1, how far below the horizon the object stands

    def attributes(self) -> tuple[str, str, str, str]:
        """The look that defines an identity: colour, pattern (+ its colour), accessory (+ colour)."""
        pattern = self.pattern if self.pattern == "plain" else f"{self.pattern_color} {self.pattern}"
        accessory = self.accessory if self.accessory == "none" else f"{self.accessory_color} {self.accessory}"
        return (self.color, pattern, accessory, str(self.n_spots) if self.pattern == "spots" else "-")


def _subject(class_name: str, **look: object) -> Callable[[np.random.Generator, str], Spec]:
    """Factory for a named identity: fixed look, random pose/size/position per call."""

    def make(rng: np.random.Generator, context: str = "plain") -> Spec:
        return Spec(class_name, context, facing=str(rng.choice(["left", "right"])),
                    size=float(rng.uniform(0.3, 1.0)), x=float(rng.random()), y=float(rng.random()),
                    **look)  # type: ignore[arg-type]

    return make


SUBJECTS: dict[str, Callable[[np.random.Generator, str], Spec]] = {
    # "a brown dog with a blue collar and three white spots": the demo's subject
    "dog": _subject("dog", color="brown", pattern="spots", pattern_color="white", n_spots=3,
                    pattern_seed=7, accessory="collar", accessory_color="blue"),
    # "a grey cat with black stripes and a red bow"
    "cat": _subject("cat", color="grey", pattern="stripes", pattern_color="black",
                    accessory="bow", accessory_color="red"),
    # "a yellow teapot with white stripes and a blue heart"
    "teapot": _subject("teapot", color="yellow", pattern="stripes", pattern_color="white",
                       accessory="heart", accessory_color="blue"),
    # "a purple backpack with two white spots and a yellow star"
    "backpack": _subject("backpack", color="purple", pattern="spots", pattern_color="white", n_spots=2,
                         pattern_seed=3, accessory="star", accessory_color="yellow"),
}
SUBJECT_SPECS: dict[str, Spec] = {k: f(np.random.default_rng(0), "plain") for k, f in SUBJECTS.items()}


def identity_of(spec: Spec) -> str:
    """Name of the subject this spec depicts, or "other"."""
    for name, subject in SUBJECT_SPECS.items():
        if spec.class_name == subject.class_name and spec.attributes()[:3] == subject.attributes()[:3]:
            return name
    return "other"


def _too_close_to_subject(spec: Spec) -> bool:
    """True when a random instance shares 3 or more of a subject's 4 look attributes.

    Stricter than exact equality, so that the subjects stay distinctive for DreamBooth: the base
    model never sees a near-copy such as the demo dog with another collar colour.
    """
    for subject in SUBJECT_SPECS.values():
        if spec.class_name == subject.class_name:
            same = sum(a == b for a, b in zip(spec.attributes()[:3], subject.attributes()[:3]))
            same += spec.pattern == subject.pattern
            if same >= 3:
                return True
    return False


def _random_look(rng: np.random.Generator, class_name: str) -> dict[str, object]:
    color = str(rng.choice(list(COLORS)))
    pattern = str(rng.choice(PATTERNS, p=[0.5, 0.25, 0.25]))
    pattern_color = "black" if color in ("white", "yellow", "pink") else str(rng.choice(PATTERN_COLORS))
    if color == "black":
        pattern_color = "white"
    return dict(color=color, pattern=pattern, pattern_color=pattern_color,
                accessory=str(rng.choice(ACCESSORIES[class_name], p=[0.5, 0.25, 0.25])),
                accessory_color=str(rng.choice(ACCESSORY_COLORS)), n_spots=int(rng.integers(2, 6)),
                pattern_seed=int(rng.integers(1 << 30)))


def random_spec(rng: np.random.Generator, classes: Sequence[str] = CLASSES,
                contexts: Sequence[str] = CONTEXTS) -> Spec:
    """A random instance of one of ``classes`` in one of ``contexts``, never a subject look-alike."""
    class_name = str(rng.choice(list(classes)))
    context = str(rng.choice(list(contexts)))
    if class_name == "none":
        return Spec("none", context)
    while True:
        spec = Spec(class_name, context, facing=str(rng.choice(["left", "right"])),
                    size=float(rng.random()), x=float(rng.random()), y=float(rng.random()),
                    **_random_look(rng, class_name))  # type: ignore[arg-type]
        if not _too_close_to_subject(spec):
            return spec


def _placed_object(spec: Spec) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """The object's colour layer and outline mask, scaled by ``size``, mirrored for ``facing``, and
    where their top-left corner goes on the canvas so that the object stands on the ground."""
    color, outline = draw_object(spec.class_name, rgb(spec.color), spec.pattern,
                                 rgb(spec.pattern_color), spec.pattern_seed, spec.n_spots,
                                 spec.accessory, rgb(spec.accessory_color))
    if spec.facing == "left":
        color, outline = ImageOps.mirror(color), ImageOps.mirror(outline)
    side = int(RENDER_SIZE * (0.45 + 0.35 * spec.size))
    color = color.resize((side, side), Image.Resampling.BILINEAR)
    outline = outline.resize((side, side), Image.Resampling.BILINEAR)
    ground = GROUND_LINE[spec.context] * RENDER_SIZE
    bottom = ground + spec.y * max(0.0, RENDER_SIZE - ground - 6)
    top = int(min(bottom - 0.9 * side, RENDER_SIZE - side))
    left = int(spec.x * (RENDER_SIZE - side))
    return color, outline, (left, max(top, -side // 8))


def _paste_object(canvas: Image.Image, spec: Spec) -> None:
    color, outline, corner = _placed_object(spec)
    canvas.paste((20, 20, 20), corner, outline)
    canvas.paste(color, corner, outline.point(lambda v: 255 if v > 200 else v))


def object_mask(spec: Spec) -> Image.Image:
    """The 64x64 L mask of where ``render`` draws the object (255 = object, outline included; soft at
    the edges like the render's own downsampling): the subject region for a masked loss."""
    canvas = Image.new("L", (RENDER_SIZE, RENDER_SIZE), 0)
    if spec.class_name != "none":
        _, outline, corner = _placed_object(spec)
        canvas.paste(255, corner, outline)
    return canvas.reduce(RENDER_SIZE // IMAGE_SIZE)


def render(spec: Spec, rng: np.random.Generator) -> Image.Image:
    """Draw ``spec`` as a 64x64 RGB image; context details (stars, leaves...) are drawn from ``rng``."""
    canvas = draw_context(spec.context, rng)
    if spec.class_name != "none":
        _paste_object(canvas, spec)
    return canvas.reduce(RENDER_SIZE // IMAGE_SIZE)


def render_subject(name: str, context: str = "plain", seed: int = 0) -> Image.Image:
    """One photo of the named subject in ``context``; pose and background vary with ``seed``."""
    rng = np.random.default_rng(seed)
    return render(SUBJECTS[name](rng, context), rng)


def describe(spec: Spec, rng: np.random.Generator) -> str:
    """Noun phrase for the object, sometimes with colour, pattern or accessory, like real prompts."""
    noun = spec.class_name
    r = rng.random()
    if r < 0.35:
        return noun
    if r < 0.75:
        return f"{spec.color} {noun}"
    extras = []
    if spec.pattern != "plain":
        extras.append(f"{spec.pattern_color} {spec.pattern}")
    if spec.accessory != "none":
        extras.append(f"a {spec.accessory_color} {spec.accessory}")
    rng.shuffle(extras)
    tail = f" with {' and '.join(extras)}" if extras else ""
    return f"{spec.color} {noun}{tail}"


def caption(spec: Spec, rng: np.random.Generator) -> str:
    """A prompt-style caption: "a photo of a red dog on the moon", "a dog in the snow", "a photo of a cup"."""
    if spec.class_name == "none":
        phrases = CONTEXT_PHRASES[spec.context]
        return str(rng.choice(["a photo of", "a picture of", "an empty scene"])) + " " + str(rng.choice(phrases))
    desc = describe(spec, rng)
    article = "an" if desc[0] in "aeiou" else "a"
    keep_context = rng.random() < (0.5 if spec.context == "plain" else 0.9)
    where = f" {rng.choice(CONTEXT_PHRASES[spec.context])}" if keep_context else ""
    template = str(rng.choice(["a photo of {}", "{}", "a picture of {}", "a close-up photo of {}",
                               "a good photo of {}", "a rendering of {}"]))
    return template.format(f"{article} {desc}{where}")


def context_phrase(context: str) -> str:
    """The canonical phrase of a context, used in evaluation prompts."""
    return CONTEXT_PHRASES[context][0]


def with_context(spec: Spec, context: str) -> Spec:
    """The same subject placed in another context."""
    return replace(spec, context=context)


__all__ = ["CLASSES", "CONTEXTS", "SCENES", "SUBJECTS", "Spec", "render", "random_spec", "caption",
           "render_subject", "object_mask", "identity_of", "context_phrase", "with_context", "IMAGE_SIZE", "LAYER"]
