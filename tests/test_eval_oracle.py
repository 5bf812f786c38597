"""OracleScorer: scores combined by hand on test doubles, then on real renders with the real oracle
and the real identity embedding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.errors import ConfigError, ModelSourceError
from dreambooth.evaluation import OracleScorer, selection_scores, toy_prompts
from dreambooth.evaluation.scorers import context_of, load_identity_embedding, load_toy_oracle


@dataclass(frozen=True)
class Label:
    class_name: str
    context: str
    identity: str


class FakeOracle:
    """Test double: labels come from `image.info` (or the defaults); features from mean colour.

    Like the real oracle it runs its heads on pooled features, so OracleScorer's feature hook
    sees them.
    """

    def __init__(self, class_name="dog", context="plain", identity="other"):
        self.defaults = {"class_name": class_name, "context": context, "identity": identity}
        self.net = torch.nn.Module()
        self.net.heads = torch.nn.ModuleDict({"identity": torch.nn.Linear(3, 5)})

    def classify(self, images):
        if not images:
            return []
        feats = torch.tensor(np.stack([np.asarray(im.convert("RGB"), np.float32).mean((0, 1))
                                       for im in images])) + 1.0  # (N, 3)
        self.net.heads["identity"](feats)
        return [Label(**{k: im.info.get(k, v) for k, v in self.defaults.items()}) for im in images]


class FakeReference:
    """Test double of fidelity.SubjectReference: an image's fidelity and "is it the subject" come
    from `image.info` ("fidelity", default 0; "subject", default False)."""

    class_name = "dog"
    identity = None

    def score(self, images, context=None):
        return float(np.mean([im.info.get("fidelity", 0.0) for im in images]))

    def is_subject(self, images):
        return [bool(im.info.get("subject", False)) for im in images]

    def score_photos(self):
        return 0.9


def img(colour=(0, 0, 0), **label) -> Image.Image:
    im = Image.new("RGB", (8, 8), colour)
    im.info.update(label)
    return im


def test_toy_prompts_and_context_lookup():
    prompts = toy_prompts("sks", "dog")
    assert prompts["a photo of sks dog on the moon"] == "moon"
    assert len(prompts) == 9 and set(prompts.values()) >= {"plain", "beach", "underwater"}
    assert all(context_of(p) == c for p, c in prompts.items())
    assert context_of("a sks dog on top of a wooden table") == "table"  # the longest phrase wins
    assert context_of("a sks dog, watercolour") is None


def test_oracle_scorer_combines_reference_and_oracle_shares():
    generated = {
        "a photo of sks dog on the moon": [img(fidelity=1.0, context="moon", subject=True),
                                           img((255, 0, 0), fidelity=0.5, context="beach"),
                                           img((0, 255, 0), class_name="cat", context="moon"),
                                           img((0, 0, 255), fidelity=0.5, context="moon", subject=True)],
        "a sks dog, watercolour": [img(fidelity=1.0, subject=True)],
    }
    class_images = [img(subject=True), img(), img(class_name="cup"), img()]
    real = [img(), img(), img()]
    result = OracleScorer(FakeOracle(), "dog", real=real, reference=FakeReference()).score(
        generated, class_images)
    moon, water = result.per_prompt
    assert moon.context == "moon" and water.context is None
    assert moon.metrics["subject_fidelity"] == 0.5 and moon.metrics["subject_recognised"] == 0.5
    assert moon.metrics["prompt_fidelity"] == 0.75
    assert moon.metrics["class_accuracy"] == 0.75 and moon.metrics["div_oracle"] > 0
    assert water.metrics == {"subject_fidelity": 1.0, "subject_recognised": 1.0, "prompt_fidelity": None,
                             "class_accuracy": 1.0, "div_oracle": None}  # no oracle identity: not built-in
    overall = result.overall
    assert overall["subject_fidelity"] == pytest.approx(3 / 5)  # pooled over all 5 images
    assert overall["prompt_fidelity"] == 0.75  # only prompts with a context count
    assert overall["language_drift"] == 0.25 and overall["class_accuracy_class_prompt"] == 0.75
    assert overall["subject_fidelity_real_images"] == 0.9
    assert result.counts == {"generated": 5, "real": 3, "class": 4, "prompts": 2}
    assert any("prompt fidelity not measured" in n for n in result.notes)
    assert selection_scores(result, 300) == {"step": 300, "fidelity": pytest.approx(0.6),
                                             "prompt_fidelity": 0.75, "drift": 0.25}
    assert {"language_drift", "subject_recognised"} <= set(result.to_dict()["definitions"])


def test_oracle_scorer_explicit_contexts_and_no_class_images():
    result = OracleScorer(FakeOracle(), "dog", contexts={"my prompt": "snow"}, reference=FakeReference()).score(
        {"my prompt": [img(context="snow")]})
    assert result.per_prompt[0].metrics["prompt_fidelity"] == 1.0
    assert result.overall["language_drift"] is None
    assert result.overall["subject_fidelity_real_images"] is None


def test_oracle_scorer_rejects_unknown_subject_and_missing_weights(tmp_path):
    with pytest.raises(ConfigError, match="giraffe"):
        OracleScorer(FakeOracle(), "giraffe", real=[img(), img()])
    with pytest.raises(ModelSourceError, match="oracle"):
        load_toy_oracle(tmp_path / "missing.safetensors")
    with pytest.raises(ModelSourceError, match="identity_embedding"):
        load_identity_embedding(tmp_path / "identity_embedding.safetensors")


# --- the real oracle on hand-made renders -------------------------------------------------------

def real_oracle():
    from dreambooth.toyworld.oracle import ORACLE_PATH

    if not ORACLE_PATH.is_file():
        pytest.skip(f"toy-world oracle weights not present yet ({ORACLE_PATH}); "
                    "they come from python scripts/pretrain_toyworld.py")
    return load_toy_oracle()


def other_dogs(n: int, context: str = "plain") -> list[Image.Image]:
    """Renders of random dogs that are not the subject (random_spec never draws a look-alike)."""
    from dreambooth.toyworld.render import random_spec, render

    rng = np.random.default_rng(123)
    return [render(random_spec(rng, classes=["dog"], contexts=[context]), rng) for _ in range(n)]


def test_real_oracle_tells_the_subject_from_other_dogs():
    from dreambooth.toyworld import render_subject
    from dreambooth.toyworld.identities import degrade

    oracle = real_oracle()
    contexts = ("moon", "beach", "snow")
    prompts = toy_prompts("sks", "dog", contexts)
    # generated images are soft: degrade the renders that stand for them, as the calibration does
    generated = {p: degrade([render_subject("dog", c, seed=s) for s in range(4)], 1) for p, c in prompts.items()}
    real = [render_subject("dog", "plain", seed=s) for s in range(10, 14)]
    scorer = OracleScorer(oracle, "dog", real=real)
    faithful = scorer.score(generated, degrade(other_dogs(8), 4)).overall
    assert faithful["subject_fidelity"] >= 0.8 and faithful["prompt_fidelity"] >= 0.8
    assert faithful["class_accuracy"] >= 0.8 and faithful["class_accuracy_class_prompt"] >= 0.8
    assert faithful["language_drift"] <= 0.2 and faithful["subject_fidelity_real_images"] >= 0.75
    # the per-image decision is strict (drift must stay ~0 on the base model), so it misses some
    assert faithful["subject_identity_oracle"] >= 0.8 and faithful["subject_recognised"] >= 0.6
    drifted = scorer.score({p: degrade(other_dogs(4, c), 2) for p, c in prompts.items()},
                           degrade([render_subject("dog", "plain", seed=s) for s in range(20, 28)], 3)).overall
    # 12 random dogs scatter around chance (0); the subject itself is at the ceiling (1)
    assert drifted["subject_fidelity"] <= 0.35 and drifted["language_drift"] >= 0.8
