"""Metrics, prompts, per-prompt bookkeeping and checkpoint choice on hand-computable embeddings."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from dreambooth.errors import ConfigError
from dreambooth.evaluation.metrics import (
    mean_pairwise_cosine,
    mean_self_similarity,
    weighted_mean,
    within_set_diversity,
)
from dreambooth.evaluation.results import (
    DINO_KEYS,
    STANDIN_KEYS,
    PromptScores,
    aggregate,
)
from dreambooth.evaluation.scorers import score_images, score_prompt
from dreambooth.evaluation.selection import select_checkpoint, selection_scores
from dreambooth.prompts import (
    LIVE_SUBJECT_PROMPTS,
    OBJECT_PROMPTS,
    class_prompt_for,
    prompts_for,
    read_prompt_file,
)

S = 1 / math.sqrt(2)


# --- metrics ----------------------------------------------------------------------------------

def test_identical_embeddings_give_one():
    same = torch.randn(1, 8).repeat(3, 1)  # (3, 8), three copies of one embedding
    assert mean_pairwise_cosine(same, same[:2] * 5.0) == pytest.approx(1.0)  # scale-free


def test_orthogonal_embeddings_give_zero():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0]])
    assert mean_pairwise_cosine(a, b) == pytest.approx(0.0)


def test_two_by_two_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # cos: (a1,b1)=1/sqrt2, (a1,b2)=1, (a2,b1)=1/sqrt2, (a2,b2)=0 -> mean (2/sqrt2 + 1) / 4
    assert mean_pairwise_cosine(a, b) == pytest.approx((2 * S + 1) / 4)


def test_diversity_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # distinct pairs: (1,2)=1/sqrt2, (1,3)=0, (2,3)=1/sqrt2 -> similarity (2/sqrt2)/3
    assert mean_self_similarity(x) == pytest.approx(2 * S / 3)
    assert within_set_diversity(x) == pytest.approx(1 - 2 * S / 3)
    assert within_set_diversity(torch.ones(4, 5)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        within_set_diversity(torch.ones(1, 5))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.ones(3), torch.ones(2, 3))


def test_weighted_mean_skips_none():
    assert weighted_mean([1.0, None, 3.0], [1, 5, 3]) == pytest.approx(10 / 4)
    assert weighted_mean([None], [2]) is None


# --- prompts ----------------------------------------------------------------------------------

def test_benchmark_lists_and_choice_by_class():
    assert len(OBJECT_PROMPTS) == len(LIVE_SUBJECT_PROMPTS) == 25
    dog = prompts_for("sks", "dog")
    assert len(dog) == 25 and "a sks dog wearing a santa hat" in dog
    clock = prompts_for("sks", "clock")
    assert "a sks clock floating in an ocean of milk" in clock
    assert not any("hat" in p for p in clock)
    assert prompts_for("sks", "Cat")[10] == "a sks Cat wearing a red hat"


@pytest.mark.parametrize("prompt, expected", [
    ("a sks dog on the moon", "a dog on the moon"),
    ("a red sks dog", "a red dog"),
    ("a photo of sks", "a photo of dog"),
    ("sks dog, sks dog", "dog, dog"),
    ("a sksy dog next to sks  dog", "a sksy dog next to dog"),
])
def test_class_prompt_for(prompt, expected):
    assert class_prompt_for(prompt, "sks", "dog") == expected


def test_class_prompt_for_multiword_class():
    assert class_prompt_for("a zwx stuffed animal in the snow", "zwx", "stuffed animal") == \
        "a stuffed animal in the snow"


def test_read_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\n\na {identifier} {class} in Paris\n{identifier} {class}, watercolor\n")
    assert read_prompt_file(f, "sks", "dog") == ["a sks dog in Paris", "sks dog, watercolor"]


def test_read_prompt_file_reports_every_bad_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a {class} alone\na {identifier} {klass}\n")
    with pytest.raises(ConfigError) as err:
        read_prompt_file(f, "sks", "dog")
    text = str(err.value)
    assert "p.txt:1" in text and "p.txt:2" in text and "{klass}" in text
    with pytest.raises(ConfigError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt", "sks", "dog")


# --- per-prompt bookkeeping ---------------------------------------------------------------------

class VectorExtractor:
    """Test double: each image carries its embedding in `image.info["vec"]`."""

    def __init__(self, kind="dino", name="vectors"):
        self.kind, self.name = kind, name

    def embed_images(self, images):
        return torch.nn.functional.normalize(torch.tensor([im.info["vec"] for im in images]), dim=-1)

    def embed_texts(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))


def image(vec):
    im = Image.new("RGB", (4, 4))
    im.info["vec"] = vec
    return im


def test_score_prompt_by_hand():
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 1.0]])
    s = score_prompt(gen, real, keys=DINO_KEYS, clip_generated=gen, clip_real=real, clip_text=text)
    assert s == pytest.approx({"dino": 0.5, "div": 1.0, "clip_i": 0.5, "clip_t": S})
    single = score_prompt(gen[:1], real, keys=STANDIN_KEYS)
    assert single == {"subject_similarity_standin": 1.0, "div_standin": None}


def test_aggregate_weights_by_images_and_pairs():
    rows = [PromptScores("a", "a", 1, {"dino": 1.0, "div": None}),
            PromptScores("b", "b", 3, {"dino": 0.0, "div": 0.6}),
            PromptScores("c", "c", 2, {"dino": 0.5, "div": 0.3})]
    overall = aggregate(rows, DINO_KEYS)
    assert overall["dino"] == pytest.approx((1 * 1.0 + 3 * 0.0 + 2 * 0.5) / 6)
    assert overall["div"] == pytest.approx((3 * 0.6 + 1 * 0.3) / 4)  # 3 pairs and 1 pair


def test_score_images_counts_and_pooled_means():
    x, y = [1.0, 0.0], [0.0, 1.0]
    generated = {"a sks dog in the snow": [image(x)], "a sks dog on the beach": [image(y)] * 3}
    real = [image(x), image(x)]
    result = score_images(generated, real, [image(x), image(y)], subject_extractor=VectorExtractor(),
                          clip=VectorExtractor("clip", "fake-clip"), identifier="sks", class_noun="dog")
    assert result.counts == {"generated": 4, "real": 2, "class": 2, "prompts": 2}
    assert result.extractors == {"subject": "vectors", "clip": "fake-clip"}
    assert result.overall["dino"] == pytest.approx(0.25)  # 1 of 4 images matches, pooled
    assert result.overall["clip_t"] == pytest.approx(0.25)
    assert result.overall["div"] == pytest.approx(0.0)  # the 3 beach images are identical
    assert result.overall["pres"] == pytest.approx(0.5)
    assert result.overall["dino_real_images"] == pytest.approx(1.0)
    snow = result.per_prompt[0]
    assert (snow.clip_prompt, snow.num_images, snow.metrics["div"]) == ("a dog in the snow", 1, None)
    json.dumps(result.to_dict(), allow_nan=False)


def test_standin_scores_never_use_dino_keys():
    result = score_images({"a sks dog": [image([1.0, 0.0])] * 2}, [image([1.0, 0.0])],
                          subject_extractor=VectorExtractor("standin", "lite0 (stand-in for DINO)"),
                          identifier="sks", class_noun="dog")
    keys = set(result.overall) | {k for r in result.per_prompt for k in r.metrics}
    assert {"subject_similarity_standin", "div_standin", "pres_standin"} <= keys
    assert not keys & {"dino", "div", "pres", "clip_i", "clip_t"}
    assert result.overall["pres_standin"] is None  # no class images given
    assert any("stand-in" in n for n in result.notes)
    assert selection_scores(result, 100)["fidelity"] == pytest.approx(1.0)


def test_clip_cannot_be_subject_extractor():
    with pytest.raises(ValueError, match="subject extractor"):
        score_images({"p": [image([1.0, 0.0])]}, [image([1.0, 0.0])],
                     subject_extractor=VectorExtractor("clip"), identifier="sks", class_noun="dog")


# --- checkpoint choice --------------------------------------------------------------------------

def row(step, fidelity, prompt_fidelity, drift):
    return {"step": step, "fidelity": fidelity, "prompt_fidelity": prompt_fidelity, "drift": drift}


def test_select_checkpoint_maximises_fidelity_within_limits():
    scores = [row(200, 0.50, 0.31, 0.40), row(400, 0.62, 0.30, 0.50),
              row(800, 0.70, 0.25, 0.55), row(1000, 0.75, 0.31, 0.80)]
    step, reason = select_checkpoint(scores, min_prompt_fidelity=0.28, max_drift=0.6)
    assert step == 400
    assert "2 of 4" in reason


def test_select_checkpoint_ties_go_to_earlier_step():
    scores = [row(600, 0.6, 0.3, 0.5), row(300, 0.6, 0.3, 0.5)]
    assert select_checkpoint(scores, min_prompt_fidelity=0.2, max_drift=0.9)[0] == 300


def test_select_checkpoint_falls_back_to_closest():
    scores = [row(200, 0.5, 0.20, 0.70), row(400, 0.6, 0.26, 0.62), row(800, 0.7, 0.10, 0.90)]
    step, reason = select_checkpoint(scores, min_prompt_fidelity=0.28, max_drift=0.6)
    assert step == 400  # shortfall 0.02 + 0.02, the smallest
    assert reason.startswith("no checkpoint met the limits")


def test_select_checkpoint_unmeasured_and_bad_rows():
    step, reason = select_checkpoint([row(1, 0.4, None, 0.1), row(2, 0.5, None, 0.9)],
                                     min_prompt_fidelity=0.3, max_drift=0.5)
    assert step == 1 and "not measured" in reason
    with pytest.raises(ValueError, match="row 0: missing 'drift'"):
        select_checkpoint([{"step": 1, "fidelity": 0.4, "prompt_fidelity": 0.3}],
                          min_prompt_fidelity=0.3, max_drift=0.5)
    with pytest.raises(ValueError):
        select_checkpoint([], min_prompt_fidelity=0.3, max_drift=0.5)
