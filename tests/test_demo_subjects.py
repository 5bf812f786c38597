"""The demo's subjects: built-in names, procedural identities `id:<seed>`, or one drawn at random
from the held-out pool; photos come with their masks; bad names are refused clearly."""
import numpy as np
import pytest
from PIL import Image

from dreambooth.demo import resolve_subject, write_subject_photos
from dreambooth.errors import ConfigError
from dreambooth.toyworld.identities import SPLITS, _article, named_identity, split_of


def test_subjects_resolve_by_name_by_seed_or_at_random_from_the_held_out_pool():
    assert resolve_subject("dog") == "dog"
    assert resolve_subject("id:2000003") == "id:2000003"
    picks = {resolve_subject(None, np.random.default_rng(seed)) for seed in range(20)}
    assert len(picks) > 15  # at random, not one fixed subject
    assert all(split_of(int(p.split(":")[1])) == "fresh" for p in picks)  # never a seed used to train or tune
    assert SPLITS["fresh"][0] == 2_000_000
    for bad in ("robot", "id:abc", "id:-4"):
        with pytest.raises(ConfigError) as raised:
            resolve_subject(bad)
        assert raised.value.problems[0].where == bad


def test_looks_read_as_english():
    from dreambooth.toyworld.identities import describe_look, subject_identity

    assert describe_look(subject_identity("dog")) == "a brown dog with white spots and a blue collar"
    assert _article("orange ball") == "an orange ball" and _article("#a448dc ball") == "a #a448dc ball"


def test_photos_of_an_identity_show_it_and_carry_masks(tmp_path):
    photos = write_subject_photos(tmp_path, "id:2000004")
    assert len(photos) == 5 and all(p.exists() for p in photos)
    masks = [p.with_name(p.stem + ".mask.png") for p in photos]
    for photo, mask in zip(photos, masks):
        m = np.asarray(Image.open(mask))
        assert m.shape == (64, 64) and 0.02 < (m > 127).mean() < 0.6
    again = write_subject_photos(tmp_path / "again", "id:2000004")  # deterministic
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(photos, again))
    other = write_subject_photos(tmp_path / "other", "id:2000005")
    assert not np.array_equal(np.asarray(Image.open(photos[0])), np.asarray(Image.open(other[0])))
    # the built-in dog still renders as it always did
    from dreambooth.toyworld import render_subject
    [dog] = write_subject_photos(tmp_path / "dog", "dog")[:1]
    assert np.array_equal(np.asarray(Image.open(dog)), np.asarray(render_subject("dog", "plain", seed=100)))


def test_an_identity_subject_is_scored_from_its_renders(tmp_path):
    """eval.subject=id:<seed>: its renders calibrate the score, so its own photos score near the
    ceiling and another identity's photos near chance."""
    from dreambooth.evaluation import OracleScorer, load_toy_oracle

    ident = named_identity("id:2000004")
    scorer = OracleScorer(load_toy_oracle(), "id:2000004", class_name=ident.class_name)
    assert scorer.builtin == "id:2000004"
    own = [Image.open(p) for p in write_subject_photos(tmp_path / "own", "id:2000004")]
    rival = next(i for i in range(2_000_100, 2_000_200) if named_identity(f"id:{i}").class_name == ident.class_name)
    other = [Image.open(p) for p in write_subject_photos(tmp_path / "other", f"id:{rival}")]
    assert scorer.reference.score(own, "plain") > 0.7
    assert scorer.reference.score(other, "plain") < 0.4
    with pytest.raises(ConfigError):
        OracleScorer(load_toy_oracle(), "id:2000004", class_name="teapot" if ident.class_name != "teapot" else "dog")


def test_saved_before_after_images_load_back_as_they_were(tmp_path):
    """The demo keeps every before/after image so its figures can be recomputed with another scorer."""
    from dreambooth.demo import SEEDS, load_images, save_images

    rng = np.random.default_rng(0)
    prompts = ["a photo of sks dog on the moon", "a photo of a dog"]
    images = {name: {p: [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in SEEDS]
                     for p in prompts} for name in ("before", "after")}
    save_images(tmp_path, images)
    back = load_images(tmp_path)
    assert list(back["after"]) == prompts
    for name in images:
        for p in prompts:
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images[name][p], back[name][p]))
