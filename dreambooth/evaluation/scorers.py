"""Scorers: the paper's feature metrics and the toy world's oracle behind one interface.

Both `FeatureScorer` (DINO or the EfficientNet stand-in, plus CLIP) and `OracleScorer` are built
once with what stays fixed (models, real subject photos, identifier or toy subject) and then
`score(generated, class_images)` images by prompt into an `EvaluationResult`, so the `evaluate`
command, checkpoint scoring during training and the demo call whichever they are given the same
way (one signature, composed rather than subclassed).

Feature metrics (Ruiz et al., CVPR 2023, sec. 4.1): DINO and CLIP-I compare every generated image
with every real subject image, CLIP-T compares each image with its prompt (identifier replaced by
the class noun), PRES compares plain class-prompt images with the real images, DIV looks at
images of the same prompt. The toy world knows what every image should show, so the oracle
counts instead: is it *our* subject, is it in the asked-for context, is it still the class, and
did the plain class prompt turn into the subject (language drift).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from PIL import Image
from torch import Tensor

from dreambooth.data.images import check_images, load_rgb
from dreambooth.errors import ConfigError, ModelSourceError, Problem
from dreambooth.evaluation.features import (
    FeatureExtractor,
    TextImageExtractor,
    load_clip,
    load_dino,
    load_standin,
)
from dreambooth.evaluation.metrics import mean_pairwise_cosine, mean_self_similarity, within_set_diversity
from dreambooth.evaluation.results import (
    DINO_KEYS,
    ORACLE_KEYS,
    STANDIN_KEYS,
    EvaluationResult,
    MetricKeys,
    PromptScores,
    aggregate,
)
from dreambooth.prompts import class_prompt_for
from dreambooth.sampling import sample_per_prompt
from dreambooth.toyworld import embedding as toy_embedding
from dreambooth.toyworld import oracle as toy_oracle
from dreambooth.toyworld.fidelity import SubjectReference, subject_reference
from dreambooth.toyworld.identities import named_identity
from dreambooth.toyworld.render import CLASSES, CONTEXT_PHRASES, CONTEXTS, SUBJECT_SPECS, context_phrase

CLIP_KEYS = ("clip_i", "clip_t", "clip_i_real_images")
ORACLE_NAME = "toy-world oracle"
MATCH_BUILTIN = 0.5  # photos whose normalised score against a built-in's renders is lower show another subject

Images = Mapping[str, Sequence[Image.Image]]  # prompt -> its generated images


class Scorer(Protocol):
    """Anything that scores images by prompt (+ plain class-prompt images) into an EvaluationResult."""

    def score(self, generated: Images, class_images: Sequence[Image.Image] = ()) -> EvaluationResult: ...


# --- what every scorer takes: the real photos, and generated images by prompt --------------------

def load_real_images(images_dir: str | Path) -> list[Image.Image]:
    """The subject photos, validated the way training validates them (every bad file named)."""
    report = check_images(images_dir, resolution=1)  # no size warnings: scoring resizes anyway
    return [load_rgb(image.path) for image in report.images]


def sample_by_prompt(pipe, prompts: Sequence[str], *, num_per_prompt: int, seed: int, steps: int,
                     guidance: float, resolution: int, negative_prompt: str = "") -> dict[str, list[Image.Image]]:
    """prompt -> its images, seeds seed..seed+N-1 for every prompt (image k of each prompt shares
    its starting noise, so differences between prompts come from the prompt)."""
    prompts = list(dict.fromkeys(prompts))  # a repeated prompt would only repeat its images
    rows = sample_per_prompt(pipe, prompts, [seed + k for k in range(num_per_prompt)], steps=steps,
                             guidance=guidance, resolution=resolution, negative_prompt=negative_prompt)
    return dict(zip(prompts, rows))


def _counts(rows: Sequence[PromptScores], real: Sequence, class_images: Sequence) -> dict[str, int]:
    return {"generated": sum(r.num_images for r in rows), "real": len(real),
            "class": len(class_images), "prompts": len(rows)}


# --- feature metrics: DINO (or the stand-in) and CLIP ---------------------------------------------

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


def metric_keys(extractor: FeatureExtractor) -> MetricKeys:
    """The keys for a subject extractor: DINO's for kind "dino", `*_standin` for the stand-in."""
    if extractor.kind == "dino":
        return DINO_KEYS
    if extractor.kind == "standin":
        return STANDIN_KEYS
    raise ValueError(f"{extractor.name} (kind {extractor.kind!r}) cannot be the subject extractor; "
                     "use DINO or the stand-in")


def score_prompt(subject_generated: Tensor, subject_real: Tensor, *, keys: MetricKeys,
                 clip_generated: Tensor | None = None, clip_real: Tensor | None = None,
                 clip_text: Tensor | None = None) -> dict[str, float | None]:
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


def score_images(generated: Images, real: Sequence[Image.Image], class_images: Sequence[Image.Image] = (),
                 *, subject_extractor: FeatureExtractor, clip: TextImageExtractor | None = None,
                 identifier: str, class_noun: str) -> EvaluationResult:
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
    rows = []
    for prompt, images in generated.items():
        clip_prompt = class_prompt_for(prompt, identifier, class_noun)
        metrics = score_prompt(
            subject_extractor.embed_images(images), subject_real, keys=keys,
            clip_generated=clip.embed_images(images) if clip else None, clip_real=clip_real,
            clip_text=clip.embed_texts([clip_prompt]) if clip else None)
        rows.append(PromptScores(prompt, clip_prompt, len(images), metrics))
    overall = aggregate(rows, keys)
    overall[keys.pres] = (mean_pairwise_cosine(subject_extractor.embed_images(class_images), subject_real)
                          if class_images else None)
    overall[keys.real_images] = mean_self_similarity(subject_real) if len(real) > 1 else None
    if clip_real is not None:
        overall["clip_i_real_images"] = mean_self_similarity(clip_real) if len(real) > 1 else None
    return EvaluationResult(
        overall=overall, per_prompt=rows, counts=_counts(rows, real, class_images),
        extractors={"subject": subject_extractor.name, **({"clip": clip.name} if clip else {})},
        notes=_feature_notes(keys, clip),
    )


def _feature_notes(keys: MetricKeys, clip: TextImageExtractor | None) -> list[str]:
    """Caveats written next to the numbers, so that metrics.json describes itself."""
    notes = [f"{keys.div}: 1 - mean pairwise cosine of subject-extractor embeddings among images "
             "of the same prompt; the paper's DIV uses LPIPS, which is not available here."]
    if keys is STANDIN_KEYS:
        notes.append("Subject scores use EfficientNet-Lite0 ImageNet features as a stand-in for "
                     "DINO; they are not comparable with published DINO or PRES numbers.")
    if clip is None:
        notes.append("No CLIP model given: CLIP-I and CLIP-T were not computed.")
    return notes


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

    def score(self, generated: Images, class_images: Sequence[Image.Image] = ()) -> EvaluationResult:
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


# --- the toy world's oracle -----------------------------------------------------------------------

def toy_prompts(identifier: str, class_noun: str, contexts: Sequence[str] | None = None) -> dict[str, str]:
    """prompt -> intended context: "a photo of sks dog on the moon" for every toy context.

    The phrasing follows the toy captions ("a photo of a dog on the moon"), with the identifier
    before the class noun as in DreamBooth's instance prompt.
    """
    chosen = CONTEXTS if contexts is None else contexts
    return {f"a photo of {identifier} {class_noun} {context_phrase(c)}": c for c in chosen}


def context_of(prompt: str) -> str | None:
    """The toy context a prompt asks for, from the longest context phrase it contains; None if none."""
    text = " ".join(prompt.lower().split())
    found = [(len(p), c) for c, phrases in CONTEXT_PHRASES.items() for p in phrases if p in text]
    return max(found)[1] if found else None


def _shipped_file(path: str | Path | None, default: Path, what: str, script: str) -> Path:
    """`path` (or the shipped default) when it exists, else a `ModelSourceError` naming the fix."""
    weights = Path(path) if path else default
    if not weights.is_file():
        raise ModelSourceError(f"Cannot load the toy-world {what}", [Problem(
            str(weights), f"no such file; the {what} weights ship with the toy world "
            f"(python scripts/{script} makes them)")])
    return weights


def load_toy_oracle(path: str | Path | None = None) -> toy_oracle.Oracle:
    """The trained oracle, or a `ModelSourceError` naming the missing weights file."""
    return toy_oracle.load_oracle(_shipped_file(path, toy_oracle.ORACLE_PATH, "oracle", "pretrain_toyworld.py"))


def load_identity_embedding(path: str | Path | None = None) -> toy_embedding.IdentityEmbedding:
    """The toy world's identity embedding, or a `ModelSourceError` naming the missing file."""
    return toy_embedding.load_embedding(_shipped_file(path, toy_embedding.EMBEDDING_PATH, "identity embedding",
                                                      "train_identity_embedding.py"))


def toy_subject_reference(embedding, subject: str | None, real: Sequence[Image.Image] = (),
                          class_name: str | None = None) -> tuple[SubjectReference, str]:
    """The open-set reference of a toy subject and a note on how it was calibrated.

    `subject` is a built-in subject ("dog": the renderer knows its look, so renders calibrate it)
    or a class noun; `real` are its photos. Photos that do not show the built-in subject of that
    name (a user's own dog, class noun "dog") make it a photos-only subject, calibrated
    leave-one-out, so any subject can be scored.
    """
    try:
        named = named_identity(subject) if subject else None
    except ValueError as e:
        raise ConfigError("Cannot score this toy-world subject", [Problem(str(subject), str(e))]) from None
    known = named is not None
    cls = class_name or (named.class_name if known else subject)
    problems = []
    if cls not in CLASSES:
        problems.append(Problem(str(subject if class_name is None else class_name),
                                f"the toy world knows the subjects {', '.join(SUBJECT_SPECS)}, procedural "
                                f"identities id:<seed> and the classes {', '.join(CLASSES)}"))
    if known and cls != named.class_name:
        problems.append(Problem(str(subject), f"is a {named.class_name}, but the class noun is {cls!r}"))
    if not known and len(real) < 2:
        problems.append(Problem(str(subject), f"not a built-in subject, so it is known only from its "
                                f"photos, and at least 2 are needed (got {len(real)})"))
    if known and len(real) == 1:
        problems.append(Problem(str(subject), "give at least 2 subject photos (or none: renders stand in)"))
    if problems:
        raise ConfigError("Cannot score this toy-world subject", problems)
    if known:
        if not real:
            return (subject_reference(embedding, cls, real, named),
                    f"subject '{subject}': no photos given, 5 renders stand in for them")
        # The photos, scored against renders of the built-in: do they show it?
        if subject_reference(embedding, cls, (), named).score(real) >= MATCH_BUILTIN:
            return subject_reference(embedding, cls, real, named), (
                f"subject '{subject}' (built-in): ceiling from renders of it, chance from other {cls}s in the "
                "same contexts")
    ref = subject_reference(embedding, cls, real)
    why = f"the photos do not show the built-in '{subject}', so " if known else ""
    return ref, (f"{why}subject known only from {len(real)} photos (class {cls}): ceiling = "
                 f"leave-one-out among them, chance from other {cls}s")


def _share(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


class OracleScorer:
    """Scores toy-world images: open-set subject fidelity, prompt fidelity, drift, diversity.

    Subject fidelity and language drift come from the identity embedding (`toyworld.fidelity`,
    the paper's DINO score, normalised between chance and ceiling), so any subject can be scored:
    `subject` is a built-in subject name or a class noun, `real` the subject photos. The oracle's
    closed-set heads judge class and context (prompt fidelity); its identity head adds a second
    opinion for built-in subjects only. `contexts` maps prompt -> intended context; by default it
    is read from each prompt's text with `context_of`. `reference` replaces the embedding's
    (tests); it needs `score(images, context)`, `is_subject(images)` and `score_photos()`.
    """

    kind = "oracle"

    def __init__(self, oracle, subject: str | None = None, *, real: Sequence[Image.Image] = (),
                 class_name: str | None = None, contexts: Mapping[str, str | None] | None = None,
                 embedding=None, reference=None, name: str = ORACLE_NAME):
        self.oracle = oracle
        self.real = list(real)
        if reference is None:
            reference, self.calibration = toy_subject_reference(
                embedding or load_identity_embedding(), subject, self.real, class_name)
        else:
            self.calibration = "reference given by the caller"
        self.reference = reference
        self.subject = subject
        self.class_name = reference.class_name
        self.builtin = subject if getattr(reference, "identity", None) is not None else None
        self.contexts = contexts
        self.name = name

    def judge(self, images: Sequence[Image.Image]) -> tuple[list, Tensor]:
        """The oracle's labels and its pooled features (N, D) of the images, from one forward pass.

        The features are the input of the oracle's heads (caught with a forward pre-hook), the
        analogue of DINO's CLS embedding, for within-prompt diversity.
        """
        caught: list[Tensor] = []
        head = self.oracle.net.heads["identity"]
        handle = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach()))
        try:
            labels = self.oracle.classify(list(images))
        finally:
            handle.remove()
        return labels, torch.cat(caught).float() if caught else torch.empty(0, 0)

    def score_prompt(self, prompt: str, images: Sequence[Image.Image], context: str | None) -> PromptScores:
        """Subject fidelity of one prompt's images, and shares that show the subject, context, class."""
        labels, features = self.judge(images)
        metrics = {
            ORACLE_KEYS.subject: self.reference.score(images, context),
            "subject_recognised": _share(self.reference.is_subject(images)),
            ORACLE_KEYS.prompt: _share([lb.context == context for lb in labels]) if context else None,
            "class_accuracy": _share([lb.class_name == self.class_name for lb in labels]),
            ORACLE_KEYS.div: within_set_diversity(features) if len(images) > 1 else None,
        }
        if self.builtin:
            metrics["subject_identity_oracle"] = _share([lb.identity == self.builtin for lb in labels])
        return PromptScores(prompt, "", len(images), metrics, context=context)

    def score(self, generated: Images, class_images: Sequence[Image.Image] = ()) -> EvaluationResult:
        """Score images by prompt, each against its intended context; class_images are plain
        class-prompt images, for language drift."""
        generated = {p: list(ims) for p, ims in generated.items() if len(ims) > 0}
        if not generated:
            raise ValueError("OracleScorer.score needs at least one generated image")
        contexts = self.contexts if self.contexts is not None else {p: context_of(p) for p in generated}
        rows = [self.score_prompt(p, ims, contexts.get(p)) for p, ims in generated.items()]
        overall = aggregate(rows, ORACLE_KEYS)
        overall.update(self._class_prompt_scores(class_images))
        overall[ORACLE_KEYS.real_images] = self.reference.score_photos() if self.real else None
        return EvaluationResult(overall=overall, per_prompt=rows,
                                counts=_counts(rows, self.real, class_images),
                                extractors={"subject": self.name}, notes=self._notes(contexts))

    def _class_prompt_scores(self, class_images: Sequence[Image.Image]) -> dict[str, float | None]:
        """Language drift: how many "a dog" images show our dog, and how many still show a dog."""
        labels = self.oracle.classify(list(class_images)) if class_images else []
        return {
            ORACLE_KEYS.pres: _share(self.reference.is_subject(list(class_images))),
            "class_accuracy_class_prompt": _share([lb.class_name == self.class_name for lb in labels]),
        }

    def _notes(self, contexts: Mapping[str, str | None]) -> list[str]:
        notes = [f"Toy world: subject fidelity and drift from the identity embedding ({self.calibration}); "
                 f"context and class shares from the {self.name} (class '{self.class_name}'). "
                 "They are not DINO or CLIP numbers."]
        unknown = [p for p, c in contexts.items() if not c]
        if unknown:
            notes.append(f"No toy context found in {len(unknown)} prompt(s): prompt fidelity not "
                         "measured for them.")
        return notes
