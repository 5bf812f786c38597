"""Open-set subject fidelity: how much generated images look like *this* subject, in [0, 1].

The DreamBooth paper's DINO score (Ruiz et al. 2023, sec. 4.1) is the mean cosine similarity of
generated images to the subject's real photos in an embedding that tells individuals apart. Raw
cosines have no fixed scale, so here they are normalised per subject between two levels measured
the same way on renders with fixed seeds:

- chance: other identities of the same class in the same contexts, drawn as the base model's
  training data draws them (``render.random_spec``), i.e. what a plain "a dog" image scores;
- ceiling: other renders of the subject itself, degraded like generated images.

``(s - chance) / (ceiling - chance)``, clipped to [0, 1]. A subject known only from photos (an
upload) cannot be rendered, so its ceiling is leave-one-out among the photos: each photo,
degraded, against the others.

``is_subject`` decides per image whether it shows the subject, for language drift: the image
must be closer to the subject than to every one of K rivals drawn the way the base model's
training data draws objects of the class (``render.random_spec``). A fixed threshold would not do:
the base model's random dogs often share a colour or a pattern with the subject, and were counted
as the subject about one time in six.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from dreambooth.toyworld.embedding import IdentityEmbedding
from dreambooth.toyworld.identities import Identity, degrade, palette_rivals, render_views
from dreambooth.toyworld.render import CLASSES, CONTEXTS

OWN_VIEWS = 12  # renders of the subject per context, for the ceiling
CHANCE_RIVALS = 32  # palette identities of the class per context, for chance
RIVAL_VIEWS = 1
DRIFT_RIVALS = 64  # palette rivals for the per-image decision
DRIFT_MARGIN = 0.0  # cosine by which the subject must beat the nearest rival


def mean_similarity(generated: Tensor, reference: Tensor) -> float:
    """Mean cosine over all pairs of unit embeddings generated (N, D) and reference (M, D)."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("mean_similarity needs at least one embedding on each side")
    return float((generated @ reference.T).mean())


def normalise(similarity: float, chance: float, ceiling: float) -> float:
    """(s - chance) / (ceiling - chance), clipped to [0, 1]; 0 when the ceiling is not above chance."""
    if ceiling <= chance:
        return 0.0
    return min(1.0, max(0.0, (similarity - chance) / (ceiling - chance)))


def _leave_one_out(embedding: IdentityEmbedding, photos: Sequence[Image.Image], seed: int) -> float:
    """Mean similarity of each photo, degraded (3 draws), to the other photos."""
    ref = embedding.embed(photos)  # (M, D)
    soft = embedding.embed(degrade([p for p in photos for _ in range(3)], seed)).reshape(len(photos), 3, -1)
    sims = [float((soft[i] @ torch.cat([ref[:i], ref[i + 1:]]).T).mean()) for i in range(len(photos))]
    return sum(sims) / len(sims)


@dataclass
class SubjectReference:
    """A subject's real-photo embeddings with its calibration, per context and computed on demand.

    ``identity`` is the subject's look when it is known (a built-in or procedural identity), which
    lets the ceiling come from its renders; None for a subject known only from ``photos``.
    """

    embedding: IdentityEmbedding
    class_name: str
    reference: Tensor  # (M, D) embeddings of the real photos
    identity: Identity | None
    photo_similarity: float  # leave-one-out among the photos: the ceiling of a photos-only subject
    seed: int = 0

    def __post_init__(self) -> None:
        self._levels: dict[str | None, tuple[float, float]] = {}
        self._rivals: Tensor | None = None

    def levels(self, context: str | None = None) -> tuple[float, float]:
        """(chance, ceiling) for images in ``context`` (None: all contexts mixed)."""
        if context not in self._levels:
            contexts = [context] if context else list(CONTEXTS)
            rivals = palette_rivals(self.class_name, CHANCE_RIVALS, seed=self.seed + 1)
            views = [v for r in rivals for v in render_views(r, RIVAL_VIEWS, contexts, seed=self.seed)]
            chance = mean_similarity(self.embedding.embed(views), self.reference)
            if self.identity is not None:
                own = render_views(self.identity, OWN_VIEWS, contexts, seed=self.seed + 1)
                ceiling = mean_similarity(self.embedding.embed(own), self.reference)
            else:
                ceiling = self.photo_similarity
            self._levels[context] = (chance, ceiling)
        return self._levels[context]

    def raw(self, images: Sequence[Image.Image]) -> float:
        """Mean cosine of the images to the real photos (the unnormalised, DINO-style score)."""
        return mean_similarity(self.embedding.embed(images), self.reference)

    def score(self, images: Sequence[Image.Image], context: str | None = None) -> float:
        """Normalised subject fidelity of images meant to show the subject in ``context``."""
        return normalise(self.raw(images), *self.levels(context))

    def score_photos(self) -> float:
        """Normalised leave-one-out score of the real photos themselves: the "Real Images" row.

        For a photos-only subject this is 1 by construction (the photos are its ceiling).
        """
        return normalise(self.photo_similarity, *self.levels(None))

    def rival_prototypes(self) -> Tensor:
        """(K, D) unit mean embeddings of K palette rivals of the class (clean renders, all contexts)."""
        if self._rivals is None:
            rivals = palette_rivals(self.class_name, DRIFT_RIVALS, seed=self.seed)
            z = self.embedding.embed([v for r in rivals for v in render_views(r, 4, seed=self.seed, jpeg=0,
                                                                               soften=False)])
            self._rivals = torch.nn.functional.normalize(z.reshape(len(rivals), 4, -1).mean(1), dim=-1)
        return self._rivals

    def is_subject(self, images: Sequence[Image.Image]) -> list[bool]:
        """Per image: closer to the subject than to the nearest palette rival (by DRIFT_MARGIN)."""
        if not images:
            return []
        z = self.embedding.embed(images)
        subject = torch.nn.functional.normalize(self.reference.mean(0), dim=-1)
        own = z @ subject  # (N,)
        rival = (z @ self.rival_prototypes().T).amax(1)  # (N,)
        return (own > rival + DRIFT_MARGIN).tolist()


def subject_reference(embedding: IdentityEmbedding, class_name: str, photos: Sequence[Image.Image] = (),
                      identity: Identity | None = None, seed: int = 0) -> SubjectReference:
    """The reference for a subject: from its photos, its identity, or both.

    Without photos, five clean renders of ``identity`` stand in for them. Without ``identity``, the
    ceiling is leave-one-out among the photos. At least two photos either way.
    """
    if class_name not in CLASSES:
        raise ValueError(f"unknown toy-world class {class_name!r}: the toy world has {', '.join(CLASSES)}")
    if identity is not None and identity.class_name != class_name:
        raise ValueError(f"identity is a {identity.class_name}, not a {class_name}")
    photos = list(photos)
    if not photos:
        if identity is None:
            raise ValueError("a subject needs its photos or a known identity; got neither")
        photos = render_views(identity, 5, ("plain", "table", "city"), seed=seed + 2, jpeg=0, soften=False)
    if len(photos) < 2:
        raise ValueError(f"scoring a subject needs at least 2 photos of it, got {len(photos)}")
    return SubjectReference(embedding, class_name, embedding.embed(photos), identity,
                            _leave_one_out(embedding, photos, seed), seed)
