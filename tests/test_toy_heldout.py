"""benchmarks/toy_heldout.py: every recipe it can run is a valid configuration of the demo, subject
specs resolve to the pools they name, and the summary's mean and worst subject are right."""
import importlib.util
from pathlib import Path

import pytest

from dreambooth.config import load_config
from dreambooth.demo import DEMO_EVAL, DEMO_MASKS
from dreambooth.toyworld.identities import SPLITS, split_of

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "toy_heldout.py"
SPEC = importlib.util.spec_from_file_location("toy_heldout", SCRIPT)
heldout = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(heldout)


@pytest.mark.parametrize("recipe", [*heldout.RECIPES, *heldout.ABLATIONS, *heldout.CANDIDATES])
def test_every_recipe_is_a_valid_demo_configuration(recipe, tmp_path):
    dotted = DEMO_EVAL + DEMO_MASKS + ["eval.subject=dog"] + heldout.RECIPES.get(recipe, []) + {
        **heldout.ABLATIONS, **heldout.CANDIDATES}.get(recipe, [])
    config = load_config("toy", {"data": {"images": str(tmp_path), "class_noun": "dog"}}, dotted)
    ours = load_config("toy", {"data": {"images": str(tmp_path), "class_noun": "dog"}},
                       DEMO_EVAL + DEMO_MASKS + ["eval.subject=dog"])
    assert (config.to_dict() == ours.to_dict()) == (recipe == "ours")  # every other recipe changes something
    if recipe == "reference":  # diffusers' example recipe, whatever the demo adds
        assert (config.train.lr, config.train.steps, config.prior.num_images) == (5e-6, 800, 200)
        assert not config.train.train_text_encoder and config.data.masks == "none" and config.eval.every == 0


def test_subject_specs_draw_from_the_pools_they_name():
    names = heldout.subject_names("builtin,fresh:3,tune:2")
    assert names[:4] == ["dog", "cat", "teapot", "backpack"] and len(names) == 9
    fresh = [int(n[3:]) for n in names[4:7]]
    tune = [int(n[3:]) for n in names[7:]]
    assert all(split_of(k) == "fresh" for k in fresh) and all(split_of(k) == "validation" for k in tune)
    assert min(tune) >= SPLITS["validation"][0] + heldout.TUNE_OFFSET
    later = heldout.subject_names("fresh:2@6,id:2000123")
    assert later[:2] == heldout.subject_names("fresh:8")[6:] and later[2] == "id:2000123"
    with pytest.raises(SystemExit, match="held"):
        heldout.subject_names("held:2")


def test_summary_gives_the_mean_and_the_worst_subject():
    def row(subject, fidelity, prompt, drift):
        return {"subject": subject, "recipe": "ours",
                "after": {"subject_fidelity": fidelity, "prompt_fidelity": prompt, "language_drift": drift}}

    summary = heldout.summarise([row("dog", 0.9, 1.0, 0.0), row("cat", 0.5, 0.9, 0.25), row("cup", 0.7, 0.4, 0.0)])
    ours = summary["ours"]
    assert ours["subjects"] == 3 and ours["mean_subject_fidelity"] == pytest.approx(0.7)
    assert ours["mean_language_drift"] == pytest.approx(0.25 / 3)
    assert ours["worst_subject"] == "cup"  # the lowest of subject and prompt fidelity decides
