"""Bookkeeping for one evaluation: embed images, score each prompt, combine, make it JSON.

The protocol is Ruiz et al. (CVPR 2023) sec. 4.1: for one subject, several images per prompt;
DINO and CLIP-I compare every generated image with every real subject image, CLIP-T compares
each image with its prompt (identifier replaced by the class noun), PRES compares plain
class-prompt images with the real images, DIV looks at images of the same prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from PIL import Image
from torch import Tensor

from dreambooth.evaluation.features import FeatureExtractor, TextImageExtractor
from dreambooth.evaluation.metrics import (
    METRIC_DEFINITIONS,
    mean_pairwise_cosine,
    mean_self_similarity,
    weighted_mean,
    within_set_diversity,
)
from dreambooth.prompts import class_prompt_for

PAPER = "Ruiz et al., DreamBooth, CVPR 2023, sec. 4.1"


@dataclass(frozen=True)
class MetricKeys:
    """Names under which subject-extractor metrics are reported.

    DINO scores go under the paper's names; stand-in scores under `*_standin`, so nobody
    mistakes an EfficientNet number for a DINO number.
    """

    subject: str
    pres: str
    div: str
    real_images: str
    prompt: str = "clip_t"  # prompt fidelity: CLIP-T, or the oracle's context share

    @property
    def pair_weighted(self) -> frozenset[str]:
        """Keys whose per-prompt values are averaged with weights n*(n-1)/2 (pairs within a prompt)."""
        return frozenset({self.div})


DINO_KEYS = MetricKeys("dino", "pres", "div", "dino_real_images")
STANDIN_KEYS = MetricKeys("subject_similarity_standin", "pres_standin", "div_standin",
                          "subject_similarity_standin_real_images")
# Toy world: the oracle's shares (see oracle_scoring.py) under their own names.
ORACLE_KEYS = MetricKeys("subject_fidelity", "language_drift", "div_oracle",
                         "subject_fidelity_real_images", prompt="prompt_fidelity")


def metric_keys(extractor: FeatureExtractor) -> MetricKeys:
    """The keys for a subject extractor: DINO's for kind "dino", `*_standin` for the stand-in."""
    if extractor.kind == "dino":
        return DINO_KEYS
    if extractor.kind == "standin":
        return STANDIN_KEYS
    raise ValueError(f"{extractor.name} (kind {extractor.kind!r}) cannot be the subject extractor; "
                     "use DINO or the stand-in")


@dataclass(frozen=True)
class PromptScores:
    """Scores of the images of one prompt."""

    prompt: str  # as given to the model, with the identifier
    clip_prompt: str  # what CLIP-T scored against: identifier replaced by the class noun
    num_images: int
    metrics: dict[str, float | None]
    context: str | None = None  # toy world: the context the prompt asks for, judged by the oracle


@dataclass(frozen=True)
class EvaluationResult:
    """Overall and per-prompt scores with what produced them; `to_dict()` is metrics.json."""

    overall: dict[str, float | None]
    per_prompt: list[PromptScores]
    counts: dict[str, int]  # generated, real, class, prompts
    extractors: dict[str, str]  # role ("subject", "clip") -> extractor name
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # how the images were made (model, seeds, steps)

    def to_dict(self) -> dict:
        """JSON-ready dict; None stands for a metric that could not be computed."""
        data = asdict(self)
        data["definitions"] = {k: METRIC_DEFINITIONS[k] for k in self.overall if k in METRIC_DEFINITIONS}
        data["protocol"] = PAPER
        return data


def score_prompt(
    subject_generated: Tensor,
    subject_real: Tensor,
    *,
    keys: MetricKeys,
    clip_generated: Tensor | None = None,
    clip_real: Tensor | None = None,
    clip_text: Tensor | None = None,
) -> dict[str, float | None]:
    """Metrics of one prompt's images from their embeddings (N, D); pure.

    clip_text is the (1, D) embedding of the class-noun version of the prompt. DIV is None for
    a single image, since diversity needs a pair.
    """
    scores: dict[str, float | None] = {
        keys.subject: mean_pairwise_cosine(subject_generated, subject_real),
        keys.div: within_set_diversity(subject_generated) if len(subject_generated) > 1 else None,
    }
    if clip_generated is not None and clip_real is not None:
        scores["clip_i"] = mean_pairwise_cosine(clip_generated, clip_real)
    if clip_generated is not None and clip_text is not None:
        scores["clip_t"] = mean_pairwise_cosine(clip_generated, clip_text)
    return scores


def aggregate(per_prompt: Sequence[PromptScores], keys: MetricKeys) -> dict[str, float | None]:
    """Overall scores, weighted so that they equal the pooled mean over all pairs.

    Per-image metrics (DINO, CLIP-I, CLIP-T) weigh each prompt by its number of images; DIV
    weighs it by its number of distinct image pairs, n*(n-1)/2.
    """
    names = list(dict.fromkeys(k for row in per_prompt for k in row.metrics))
    overall: dict[str, float | None] = {}
    for name in names:
        n = [row.num_images for row in per_prompt]
        weights = [k * (k - 1) / 2 for k in n] if name in keys.pair_weighted else [float(k) for k in n]
        overall[name] = weighted_mean([row.metrics.get(name) for row in per_prompt], weights)
    return overall


def score_images(
    generated: Mapping[str, Sequence[Image.Image]],
    real: Sequence[Image.Image],
    class_images: Sequence[Image.Image] = (),
    *,
    subject_extractor: FeatureExtractor,
    clip: TextImageExtractor | None = None,
    identifier: str,
    class_noun: str,
) -> EvaluationResult:
    """Score generated images (prompt -> images) against the real subject images.

    class_images are images of the plain class prompt ("a dog") from the fine-tuned model, for
    PRES; leave empty to skip PRES. Without `clip`, CLIP-I and CLIP-T are left out.
    """
    keys = metric_keys(subject_extractor)
    generated = {p: list(ims) for p, ims in generated.items() if len(ims) > 0}
    if not generated or not real:
        raise ValueError("score_images needs at least one generated image and one real image")
    subject_real = subject_extractor.embed_images(real)  # (M, D)
    clip_real = clip.embed_images(real) if clip is not None else None
    rows = [
        _score_one_prompt(prompt, images, subject_real, clip_real, keys,
                          subject_extractor, clip, identifier, class_noun)
        for prompt, images in generated.items()
    ]
    overall = aggregate(rows, keys)
    overall[keys.pres] = (mean_pairwise_cosine(subject_extractor.embed_images(class_images), subject_real)
                          if class_images else None)
    overall[keys.real_images] = mean_self_similarity(subject_real) if len(real) > 1 else None
    if clip_real is not None:
        overall["clip_i_real_images"] = mean_self_similarity(clip_real) if len(real) > 1 else None
    return EvaluationResult(
        overall=overall,
        per_prompt=rows,
        counts={"generated": sum(r.num_images for r in rows), "real": len(real),
                "class": len(class_images), "prompts": len(rows)},
        extractors={"subject": subject_extractor.name, **({"clip": clip.name} if clip else {})},
        notes=_notes(keys, clip),
    )


def _score_one_prompt(
    prompt: str, images: list[Image.Image], subject_real: Tensor, clip_real: Tensor | None,
    keys: MetricKeys, subject_extractor: FeatureExtractor, clip: TextImageExtractor | None,
    identifier: str, class_noun: str,
) -> PromptScores:
    """Embed one prompt's images (and its class-noun text) and score them."""
    clip_prompt = class_prompt_for(prompt, identifier, class_noun)
    metrics = score_prompt(
        subject_extractor.embed_images(images), subject_real, keys=keys,
        clip_generated=clip.embed_images(images) if clip else None,
        clip_real=clip_real,
        clip_text=clip.embed_texts([clip_prompt]) if clip else None,
    )
    return PromptScores(prompt, clip_prompt, len(images), metrics)


def _notes(keys: MetricKeys, clip: TextImageExtractor | None) -> list[str]:
    """Caveats written next to the numbers, so that metrics.json describes itself."""
    notes = [f"{keys.div}: 1 - mean pairwise cosine of subject-extractor embeddings among images "
             "of the same prompt; the paper's DIV uses LPIPS, which is not available here."]
    if keys is STANDIN_KEYS:
        notes.append("Subject scores use EfficientNet-Lite0 ImageNet features as a stand-in for "
                     "DINO; they are not comparable with published DINO or PRES numbers.")
    if clip is None:
        notes.append("No CLIP model given: CLIP-I and CLIP-T were not computed.")
    return notes


def selection_scores(result: EvaluationResult, step: int) -> dict[str, float | int | None]:
    """The row `select_checkpoint` takes: subject fidelity, prompt fidelity, drift.

    DINO (or stand-in) fidelity, CLIP-T and PRES for real models; the oracle's subject fidelity,
    prompt fidelity and language drift for the toy world.
    """
    keys = next((k for k in (ORACLE_KEYS, STANDIN_KEYS) if k.subject in result.overall), DINO_KEYS)
    return {
        "step": step,
        "fidelity": result.overall.get(keys.subject),
        "prompt_fidelity": result.overall.get(keys.prompt),
        "drift": result.overall.get(keys.pres),
    }
