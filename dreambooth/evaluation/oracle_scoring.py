"""Toy-world scoring: the oracle classifier judges DreamBooth outputs where DINO/CLIP cannot.

In the toy world we know what every image should show, so instead of embedding similarities we
count: is it *our* subject (identity head), is it in the asked-for context (context head), is it
still the class (class head), and did the plain class prompt turn into the subject (language
drift). Results come back as the same `EvaluationResult` as the DINO/CLIP scores, so metrics.json,
the report and checkpoint choice need nothing special for the toy world.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor

from dreambooth.errors import ConfigError, ModelSourceError, Problem
from dreambooth.evaluation.metrics import within_set_diversity
from dreambooth.evaluation.scoring import ORACLE_KEYS, EvaluationResult, PromptScores, aggregate

ORACLE_NAME = "toy-world oracle"


def toy_prompts(identifier: str, class_noun: str, contexts: Sequence[str] | None = None) -> dict[str, str]:
    """prompt -> intended context: "a photo of sks dog on the moon" for every toy context.

    The phrasing follows the toy captions ("a photo of a dog on the moon"), with the identifier
    before the class noun as in DreamBooth's instance prompt.
    """
    from dreambooth.toyworld.render import CONTEXTS, context_phrase

    chosen = CONTEXTS if contexts is None else contexts
    return {f"a photo of {identifier} {class_noun} {context_phrase(c)}": c for c in chosen}


def context_of(prompt: str) -> str | None:
    """The toy context a prompt asks for, from the longest context phrase it contains; None if none."""
    from dreambooth.toyworld.render import CONTEXT_PHRASES

    text = " ".join(prompt.lower().split())
    found = [(len(p), c) for c, phrases in CONTEXT_PHRASES.items() for p in phrases if p in text]
    return max(found)[1] if found else None


def load_toy_oracle(path: str | Path | None = None):
    """The trained oracle, or a `ModelSourceError` naming the missing weights file."""
    from dreambooth.toyworld import oracle as toy_oracle

    weights = Path(path) if path else toy_oracle.ORACLE_PATH
    if not weights.is_file():
        raise ModelSourceError("Cannot load the toy-world oracle", [Problem(
            str(weights), "no such file; the oracle weights ship with the toy world "
            "(python scripts/pretrain_toyworld.py makes them)")])
    return toy_oracle.load_oracle(weights)


def _share(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


class OracleScorer:
    """Scores toy-world images with the oracle: subject fidelity, prompt fidelity, drift, diversity.

    `subject` is a toy subject name (`dreambooth.toyworld.SUBJECTS`, e.g. "dog"); `real` are the
    subject photos used for training, scored as the ceiling for subject fidelity.
    """

    kind = "oracle"

    def __init__(self, oracle, subject: str, *, real: Sequence[Image.Image] = (),
                 name: str = ORACLE_NAME):
        from dreambooth.toyworld.render import SUBJECT_SPECS

        if subject not in SUBJECT_SPECS:
            raise ConfigError("Unknown toy-world subject", [Problem(
                subject, f"the oracle knows the subjects {', '.join(SUBJECT_SPECS)}")])
        self.oracle = oracle
        self.subject = subject
        self.class_name = SUBJECT_SPECS[subject].class_name
        self.real = list(real)
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
        """Shares of one prompt's images that show the subject, the context and the class."""
        labels, features = self.judge(images)
        metrics = {
            ORACLE_KEYS.subject: _share([lb.identity == self.subject for lb in labels]),
            ORACLE_KEYS.prompt: _share([lb.context == context for lb in labels]) if context else None,
            "class_accuracy": _share([lb.class_name == self.class_name for lb in labels]),
            ORACLE_KEYS.div: within_set_diversity(features) if len(images) > 1 else None,
        }
        return PromptScores(prompt, "", len(images), metrics, context=context)

    def score(self, generated: Mapping[str, Sequence[Image.Image]],
              class_images: Sequence[Image.Image] = (), *,
              contexts: Mapping[str, str | None] | None = None) -> EvaluationResult:
        """Score images by prompt; `contexts` maps prompt -> intended context (default: read
        from the prompt text with `context_of`). class_images are plain class-prompt images."""
        generated = {p: list(ims) for p, ims in generated.items() if len(ims) > 0}
        if not generated:
            raise ValueError("OracleScorer.score needs at least one generated image")
        contexts = contexts if contexts is not None else {p: context_of(p) for p in generated}
        rows = [self.score_prompt(p, ims, contexts.get(p)) for p, ims in generated.items()]
        overall = aggregate(rows, ORACLE_KEYS)
        overall.update(self._class_prompt_scores(class_images))
        overall[ORACLE_KEYS.real_images] = _share(
            [lb.identity == self.subject for lb in self.oracle.classify(self.real)])
        return EvaluationResult(
            overall=overall, per_prompt=rows,
            counts={"generated": sum(r.num_images for r in rows), "real": len(self.real),
                    "class": len(class_images), "prompts": len(rows)},
            extractors={"subject": self.name}, notes=self._notes(contexts),
        )

    def _class_prompt_scores(self, class_images: Sequence[Image.Image]) -> dict[str, float | None]:
        """Language drift: how many "a dog" images show our dog, and how many still show a dog."""
        labels = self.oracle.classify(list(class_images)) if class_images else []
        return {
            ORACLE_KEYS.pres: _share([lb.identity == self.subject for lb in labels]),
            "class_accuracy_class_prompt": _share([lb.class_name == self.class_name for lb in labels]),
        }

    def _notes(self, contexts: Mapping[str, str | None]) -> list[str]:
        notes = [f"Toy world: scores are shares of images as classified by the {self.name} "
                 f"(subject '{self.subject}', class '{self.class_name}'); they are not DINO or "
                 "CLIP numbers."]
        unknown = [p for p, c in contexts.items() if not c]
        if unknown:
            notes.append(f"No toy context found in {len(unknown)} prompt(s): prompt fidelity not "
                         "measured for them.")
        return notes
