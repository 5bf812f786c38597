"""Presets load, overrides apply with types, and every problem is reported at once."""
from dataclasses import fields

import pytest

from dreambooth.config import GROUPS, SAMPLERS, describe_config, load_config, read_run_config, save_config
from dreambooth.config_files import list_presets
from dreambooth.errors import ConfigError
from dreambooth.training.preflight import resume_config

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


def test_a_bare_no_is_the_word_for_mixed_precision_and_other_booleans_ask_for_quotes():
    # YAML 1.1 reads `no` as False: mixed_precision takes the word, from a file or from the CLI
    assert load_config("tiny", {**REQUIRED, "train": {"mixed_precision": False}}).train.mixed_precision == "no"
    assert load_config("tiny", REQUIRED, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    for bad in ("data.identifier=on", "prior.negative_prompt=off", "train.mode=yes", "train.mixed_precision=yes"):
        with pytest.raises(ConfigError) as info:
            load_config("tiny", REQUIRED, [bad])
        [problem] = info.value.problems
        assert problem.where == bad.split("=")[0] and "quote it" in problem.message, problem


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", {}, ["train.lr=-1", "train.mode=xx", "data.resolution=63", "foo.bar=1",
                                 "train.steps=abc", "prior.nope=1", "nodot"])
    where = {p.where for p in info.value.problems}
    assert {"train.lr", "train.mode", "data.resolution", "foo", "train.steps", "prior.nope", "nodot",
            "data.class_noun"} <= where
    assert "8 problem(s)" in str(info.value) or len(info.value.problems) >= 8


def test_a_bad_train_device_names_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", REQUIRED, ["train.device=gpu"])
    [problem] = info.value.problems
    assert problem.where == "train.device" and "'gpu'" in problem.message and "auto, cpu, cuda" in problem.message


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


NUMERIC = [(group, f) for group, cls in GROUPS.items() for f in fields(cls) if f.type in ("int", "float")]


@pytest.mark.parametrize("group,f", NUMERIC, ids=[f"{g}.{f.name}" for g, f in NUMERIC])
def test_every_numeric_field_has_an_enforced_documented_range(group, f):
    """The web app and the CLI share these bounds: each is shown by describe_config and refused
    just outside, with the field named; NaN and infinity are refused for every float."""
    from dreambooth.config_ranges import field_range, range_text

    bounds = field_range(f)
    assert bounds is not None, f"{group}.{f.name} has no range"
    lo, hi, above, multiple = bounds
    assert f"{group}.{f.name} = " in describe_config() and range_text(bounds) in describe_config()
    step = 1 if f.type == "int" else 1e-9 * max(1.0, abs(hi))
    outside = [hi + (multiple or step), lo if above else lo - step]
    if f.type == "float":
        outside += [float("nan"), float("inf")]
    for value in outside:
        with pytest.raises(ConfigError) as info:
            load_config("tiny", REQUIRED, [f"{group}.{f.name}={value}"])
        assert f"{group}.{f.name}" in {p.where for p in info.value.problems}, value


def test_a_whole_float_for_an_int_field_gets_the_range_message():
    """JSON numbers such as 1e9 arrive as floats; the message must be about the range, not the type."""
    with pytest.raises(ConfigError) as info:
        load_config("tiny", {**REQUIRED, "prior": {"num_images": 1e9}})
    assert [str(p) for p in info.value.problems] == ["error: prior.num_images: 1000000000: must be in [0, 10000]"]
    assert load_config("tiny", {**REQUIRED, "train": {"steps": 7.0}}).train.steps == 7


def test_the_config_offers_exactly_the_samplers_sampling_can_build():
    """config.SAMPLERS is the light copy the CLI and config validation read (sampling imports torch)."""
    from dreambooth.sampling import SAMPLER_CLASSES

    assert SAMPLERS == tuple(SAMPLER_CLASSES)
