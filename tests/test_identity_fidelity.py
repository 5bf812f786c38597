"""Open-set subject fidelity: procedural identities, the shipped identity embedding, the normalised
score, and the toy scorer on a subject known only from its photos. Uses the shipped weights (no
training here); held-out identities come from the validation and fresh seed ranges."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth.errors import ConfigError
from dreambooth.evaluation.scorers import OracleScorer, load_identity_embedding, load_toy_oracle
from dreambooth.toyworld.embedding import EmbeddingNet, IdentityEmbedding, supcon_loss
from dreambooth.toyworld.fidelity import normalise, subject_reference
from dreambooth.toyworld.identities import (
    SPLITS,
    fresh_identities,
    identities,
    identity,
    render_views,
    split_of,
    subject_identity,
)
from dreambooth.toyworld.render import rgb


@pytest.fixture(scope="module")
def embedding() -> IdentityEmbedding:
    return load_identity_embedding()


def photos_of(ident, n=5):
    return render_views(ident, n, ("plain", "table", "city"), seed=3, jpeg=0, soften=False)


def test_identity_seeds_are_deterministic_and_ranges_disjoint():
    assert identity(123) == identity(123) and identity(123) != identity(124)
    assert identity(7, "teapot").class_name == "teapot"
    bounds = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))  # no overlap
    assert [split_of(s) for s in (0, 999_999, 1_000_000, 1_099_999, 1_100_000, 1_199_999, 2_000_000)] == [
        "train", "train", "calibration", "calibration", "validation", "validation", "fresh"]
    assert all(i.key >= 2_000_000 for i in fresh_identities(3, "cat"))
    assert [i.key for i in identities("validation", 2, start=5)] == [1_100_005, 1_100_006]
    a, b = render_views(identity(5), 3, seed=1), render_views(identity(5), 3, seed=1)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    colours = {identity(s).look.color for s in range(200)}
    assert any(c.startswith("#") for c in colours) and any(not c.startswith("#") for c in colours)
    with pytest.raises(ValueError, match="in no range"):
        split_of(1_500_000)
    with pytest.raises(ValueError, match="unknown toy-world class 'giraffe'"):
        identity(1, "giraffe")
    with pytest.raises(ValueError, match="do not fit"):
        identities("calibration", 10, start=99_995)
    with pytest.raises(ValueError, match="contexts"):
        render_views(identity(1), 2, ("mars",))
    with pytest.raises(ValueError, match="'#12345'"):
        rgb("#12345")


def separation(emb: IdentityEmbedding) -> tuple[float, float]:
    """(gap between same- and different-identity mean cosine, top-1 retrieval) on 24 held-out
    identities x 3 degraded views."""
    ids = identities("validation", 24, start=90_000)
    z = emb.embed([v for i in ids for v in render_views(i, 3, seed=4)])
    label = torch.arange(24).repeat_interleave(3)
    sim = z @ z.T
    same = (label[:, None] == label[None]) & ~torch.eye(72, dtype=torch.bool)
    gap = float(sim[same].mean() - sim[label[:, None] != label[None]].mean())
    top1 = float((label[sim.fill_diagonal_(-2).argmax(1)] == label).float().mean())
    return gap, top1


def test_shipped_embedding_tells_held_out_identities_apart(embedding):
    gap, top1 = separation(embedding)
    assert gap >= 0.5 and top1 >= 0.8, (gap, top1)
    torch.manual_seed(0)  # an untrained net of the same shape fails the same bar
    r_gap, r_top1 = separation(IdentityEmbedding(EmbeddingNet()))
    assert not (r_gap >= 0.5 and r_top1 >= 0.8), (r_gap, r_top1)


def test_supcon_loss_prefers_grouped_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    grouped = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]), dim=-1)
    assert supcon_loss(grouped, labels) < supcon_loss(grouped[[0, 2, 1, 3]], labels)
    with pytest.raises(ValueError, match="two samples"):
        supcon_loss(grouped[:3], labels[:3])


def test_normalise_is_clipped_and_safe():
    assert normalise(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert normalise(0.9, 0.2, 0.8) == 1.0 and normalise(0.1, 0.2, 0.8) == 0.0
    assert normalise(0.5, 0.8, 0.8) == 0.0  # no room between chance and ceiling


@pytest.mark.parametrize("known", [True, False], ids=["renders", "photos-only"])
def test_own_renders_score_near_one_other_identities_near_zero(embedding, known):
    a, b = fresh_identities(2, "dog")
    ref = subject_reference(embedding, "dog", photos_of(a), a if known else None)
    own, other = ref.score(render_views(a, 6, seed=9)), ref.score(render_views(b, 6, seed=9))
    assert own >= 0.8 and other <= 0.5 and own - other >= 0.5, (own, other)
    assert ref.score(render_views(a, 4, ("moon",), seed=9), "moon") >= 0.8


def test_scorer_on_a_subject_given_only_by_photos(embedding):
    cup, rival = fresh_identities(2, "cup")
    photos = [p.resize((160, 160)) for p in photos_of(cup)]  # any size: resized to 64 px
    scorer = OracleScorer(load_toy_oracle(), "cup", real=photos, embedding=embedding)
    assert "only from 5 photos" in scorer.calibration and scorer.builtin is None
    prompt = "a photo of sks cup on the beach"
    result = scorer.score({prompt: render_views(cup, 4, ("beach",), seed=8)},
                          render_views(rival, 4, seed=8)).overall
    assert result["subject_fidelity"] >= 0.8 and result["subject_recognised"] >= 0.75
    assert result["language_drift"] == 0.0 and result["prompt_fidelity"] >= 0.75
    assert "subject_identity_oracle" not in result  # the closed-set head knows no such cup
    other = scorer.score({prompt: render_views(rival, 4, ("beach",), seed=8)}).overall
    assert other["subject_fidelity"] <= 0.5  # one rival cup: near chance (0), not near the subject (1)
    assert result["subject_fidelity"] - other["subject_fidelity"] >= 0.5


def test_photos_of_another_dog_are_not_taken_for_the_builtin_dog(embedding):
    photos = photos_of(fresh_identities(1, "dog")[0])
    assert "do not show the built-in 'dog'" in OracleScorer(
        load_toy_oracle(), "dog", real=photos, embedding=embedding).calibration
    builtin = photos_of(subject_identity("dog"))
    assert "(built-in)" in OracleScorer(load_toy_oracle(), "dog", real=builtin, embedding=embedding).calibration


def test_bad_subjects_are_reported_clearly(embedding):
    oracle = load_toy_oracle()
    with pytest.raises(ConfigError) as err:
        OracleScorer(oracle, "giraffe", embedding=embedding)
    assert "giraffe" in err.value.report() and "at least 2" in err.value.report()
    with pytest.raises(ConfigError, match="Cannot score"):
        OracleScorer(oracle, "cup", real=[], embedding=embedding)  # not built-in: photos needed
    with pytest.raises(ValueError, match="at least 2 photos"):
        subject_reference(embedding, "cup", photos_of(identity(3, "cup"), 1))
    with pytest.raises(ValueError, match="unknown toy-world class 'car'"):
        subject_reference(embedding, "car", photos_of(identity(3, "cup")))
