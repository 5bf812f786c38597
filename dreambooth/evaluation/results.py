"""Evaluation results: the metric names, per-prompt and overall scores, and how they combine.

Every scorer (DINO/CLIP, the stand-in, the toy-world oracle) returns an `EvaluationResult`, so
metrics.json, the report and the checkpoint choice read one shape. The protocol is Ruiz et al.
(CVPR 2023) sec. 4.1: several images per prompt for one subject; per-prompt scores combine into
overall ones weighted so that they equal the pooled mean over all images (or image pairs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from dreambooth.evaluation.metrics import METRIC_DEFINITIONS, weighted_mean

PAPER = "Ruiz et al., DreamBooth, CVPR 2023, sec. 4.1"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class MetricKeys:
    """Names under which a scorer reports subject fidelity, drift, diversity and prompt fidelity.

    DINO scores go under the paper's names; stand-in scores under `*_standin`, so nobody
    mistakes an EfficientNet number for a DINO number; the oracle's shares under their own names.
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
ORACLE_KEYS = MetricKeys("subject_fidelity", "language_drift", "div_oracle",
                         "subject_fidelity_real_images", prompt="prompt_fidelity")


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


def aggregate(per_prompt: Sequence[PromptScores], keys: MetricKeys) -> dict[str, float | None]:
    """Overall scores, weighted so that they equal the pooled mean over all pairs.

    Per-image metrics (DINO, CLIP-I, CLIP-T, the oracle's shares) weigh each prompt by its number
    of images; DIV weighs it by its number of distinct image pairs, n*(n-1)/2.
    """
    names = list(dict.fromkeys(k for row in per_prompt for k in row.metrics))
    overall: dict[str, float | None] = {}
    for name in names:
        n = [row.num_images for row in per_prompt]
        weights = [k * (k - 1) / 2 for k in n] if name in keys.pair_weighted else [float(k) for k in n]
        overall[name] = weighted_mean([row.metrics.get(name) for row in per_prompt], weights)
    return overall


def format_score(value: float | int | None, digits: int = 3) -> str:
    """A score for people to read: `digits` decimals, or "not measured" for None."""
    return NOT_MEASURED if value is None else f"{value:.{digits}f}"
