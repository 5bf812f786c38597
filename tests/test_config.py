"""Presets load, overrides apply with types, and every problem is reported at once."""
import pytest

from dreambooth.config import describe_config, list_presets, load_config, read_run_config, save_config
from dreambooth.errors import ConfigError
from dreambooth.training.loop import resume_config

REQUIRED = {"data": {"class_noun": "dog", "images": "photos"}}


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    config = load_config(preset, REQUIRED)
    assert config.train.mode in ("full", "lora")


def test_required_presets_exist():
    assert {"sd15-full", "sd15-lora", "sd21-v-full", "tiny"} <= set(list_presets())
    assert load_config("sd21-v-full", REQUIRED).model.prediction_type == "v_prediction"


def test_dotted_overrides_are_typed():
    config = load_config("tiny", REQUIRED, ["train.lr=2e-5", "train.steps=7", "prior.enabled=false",
                                             "output.sample_prompts=[a, b]"])
    assert config.train.lr == 2e-5 and config.train.steps == 7 and config.prior.enabled is False
    assert config.output.sample_prompts == ["a", "b"]


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", {}, ["train.lr=-1", "train.mode=xx", "data.resolution=63", "foo.bar=1",
                                 "train.steps=abc", "prior.nope=1", "nodot"])
    where = {p.where for p in info.value.problems}
    assert {"train.lr", "train.mode", "data.resolution", "foo", "train.steps", "prior.nope", "nodot",
            "data.class_noun"} <= where
    assert "8 problem(s)" in str(info.value) or len(info.value.problems) >= 8


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="sd15-full"):
        load_config("no-such-preset", REQUIRED)


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config("sd15-lora", REQUIRED, ["train.lora_rank=8"])
    save_config(config, tmp_path / "config.yaml")
    assert read_run_config(tmp_path / "config.yaml") == config


def test_resume_refuses_changed_training_settings():
    saved = load_config("tiny", REQUIRED)
    changed = load_config("tiny", REQUIRED, ["train.lr=0.5", "train.steps=10", "output.keep_checkpoints=5"])
    with pytest.raises(ConfigError, match="train.lr"):
        resume_config(saved, changed)
    longer = load_config("tiny", REQUIRED, ["train.steps=10", "output.keep_checkpoints=5"])
    merged = resume_config(saved, longer)
    assert merged.train.steps == 10 and merged.output.keep_checkpoints == 5


def test_every_field_has_help():
    text = describe_config()
    assert "train.lr" in text and "\n    \n" not in text
