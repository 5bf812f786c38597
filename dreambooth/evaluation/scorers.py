"""Scorers: one interface over the paper's feature metrics and the toy world's oracle.

Both `FeatureScorer` (DINO or stand-in, plus CLIP) and `OracleScorer` take generated images by
prompt and plain class-prompt images and return an `EvaluationResult`, so `evaluate_run` and
checkpoint scoring call whichever they are given the same way (one signature, composed rather than subclassed).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from PIL import Image

from dreambooth.errors import ModelSourceError
from dreambooth.evaluation.features import (
    FeatureExtractor,
    TextImageExtractor,
    load_clip,
    load_dino,
    load_standin,
)
from dreambooth.evaluation.scoring import EvaluationResult, score_images

CLIP_KEYS = ("clip_i", "clip_t", "clip_i_real_images")


class Scorer(Protocol):
    """Anything that scores images by prompt (+ class-prompt images) into an EvaluationResult."""

    def score(self, generated: Mapping[str, Sequence[Image.Image]],
              class_images: Sequence[Image.Image] = ()) -> EvaluationResult: ...


@dataclass(frozen=True)
class Extractors:
    """The feature models of one evaluation; `clip_error` says why CLIP is missing, if it is."""

    subject: FeatureExtractor
    clip: TextImageExtractor | None = None
    clip_error: str | None = None


def load_extractors(dino: str | Path | None = None, clip: str | Path | None = None, *,
                    standin: bool = False, device: str = "cpu") -> Extractors:
    """DINO and CLIP from folders or hub ids; errors propagate unless `standin` is set.

    With `standin`, the EfficientNet-Lite0 stand-in replaces DINO (its scores go under
    `*_standin` keys) and a CLIP that cannot be loaded is recorded as not measured instead of
    failing, so an offline machine can still evaluate. Without it, a missing model is an error
    that names the model and the fix: the user asked for the paper's metrics.
    """
    if not standin:
        return Extractors(load_dino(dino, device=device), load_clip(clip, device=device))
    try:
        clip_model, error = load_clip(clip, device=device), None
    except ModelSourceError as err:
        clip_model, error = None, err.report()
    return Extractors(load_standin(device=device), clip_model, error)


class FeatureScorer:
    """The paper's metrics (Ruiz et al. 4.1) against the real subject images."""

    def __init__(self, extractors: Extractors, real: Sequence[Image.Image], *,
                 identifier: str, class_noun: str):
        if not real:
            raise ValueError("FeatureScorer needs at least one real subject image")
        self.extractors = extractors
        self.real = list(real)
        self.identifier = identifier
        self.class_noun = class_noun

    def score(self, generated: Mapping[str, Sequence[Image.Image]],
              class_images: Sequence[Image.Image] = ()) -> EvaluationResult:
        """score_images, with CLIP metrics recorded as None (not measured) when CLIP is missing."""
        ex = self.extractors
        result = score_images(generated, self.real, class_images, subject_extractor=ex.subject,
                              clip=ex.clip, identifier=self.identifier, class_noun=self.class_noun)
        if ex.clip is not None:
            return result
        overall = {**result.overall, **{k: None for k in CLIP_KEYS}}
        notes = list(result.notes)
        if ex.clip_error:  # say why, in place of score_images' generic "no CLIP model given"
            notes = [n for n in notes if not n.startswith("No CLIP model given")]
            notes.append("CLIP could not be loaded, so CLIP-I and CLIP-T are not measured: "
                         + ex.clip_error.splitlines()[0])
        return replace(result, overall=overall, notes=notes)
