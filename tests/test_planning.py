"""Tier presets and the planner: which preset fits which card, told from fake cards."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from dreambooth.cli.main import main
from dreambooth.config import load_config
from dreambooth.config_files import list_presets
from dreambooth.errors import ConfigError
from dreambooth.model_family import model_family
from dreambooth.planning import FAMILIES, Card, load_tiers, parse_memory, pick_preset, plan, read_card

# Memory as torch.cuda reports it (total_memory / 1e9), not the number on the box.
T4 = Card("Tesla T4", 15.84, (7, 5))
RTX3060 = Card("NVIDIA GeForce RTX 3060", 12.88, (8, 6))
RTX3070 = Card("NVIDIA GeForce RTX 3070", 8.59, (8, 6))
RTX4090 = Card("NVIDIA GeForce RTX 4090", 25.38, (8, 9))
H100 = Card("NVIDIA H100 80GB HBM3", 85.03, (9, 0))
CPU = Card("CPU", None, None)


@pytest.mark.parametrize("card,sd15,sd21,sdxl,precision", [
    (T4, "sd15-12gb", "sd21-16gb", "sdxl-lora", "fp16"),
    (RTX3060, "sd15-12gb", "sd21-lora-8gb", "sdxl-lora", "bf16"),
    (RTX3070, "sd15-8gb", "sd21-lora-8gb", "sdxl-lora-8gb", "bf16"),
    (RTX4090, "sd15-24gb", "sd21-16gb", "sdxl-full-24gb", "bf16"),
    (H100, "sd15-24gb", "sd21-16gb", "sdxl-full-24gb", "bf16"),
])
def test_plan_picks_the_largest_preset_that_fits_each_card(card, sd15, sd21, sdxl, precision):
    for family, expected in (("sd15", sd15), ("sd21", sd21), ("sdxl", sdxl)):
        result = plan(family, card)
        assert result.best == expected
        assert {r.tier.family for r in result.rows} == {family}
        fitting = [r.tier.target_gb for r in result.rows if r.fits]
        if expected is None:
            assert not fitting
        else:
            assert max(fitting) == next(r.tier.target_gb for r in result.rows if r.tier.preset == expected)
        auto = [r for r in result.rows if r.tier.mixed_precision == "auto"]
        assert auto and all(r.precision == precision for r in auto)
        for row in (r for r in result.rows if r.tier.mixed_precision == "bf16"):  # sdxl-full-24gb: bf16 weights
            assert row.precision == "bf16" and (card.bf16 or (not row.fits and "native bf16" in row.why))
    if not card.bf16:
        assert any("fp16" in n for n in plan("sd21", card).notes)


def test_cpu_plans_for_the_tiny_models_only():
    assert plan("sd15", CPU).best is None
    assert all(not r.fits and "needs a CUDA GPU" in r.why for r in plan("sd21", CPU).rows)
    tiny = plan("tiny", CPU)
    assert tiny.best == "tiny" and all(r.fits and r.precision == "fp32" for r in tiny.rows)
    assert plan("sdxl", CPU).best is None and plan("tiny-xl", CPU).best == "tiny-xl"
    assert any("no GPU" in n for n in tiny.notes)


def test_a_card_below_every_target_gets_none_and_the_smallest_preset_named():
    """A 4 GB card: below even the LoRA tier's measured 5.4 GB peak."""
    result = plan("sd15", Card("GTX 1650", 4.2, (7, 5)))
    assert result.best is None and not any(r.fits for r in result.rows)
    assert any("sd15-8gb" in n for n in result.notes)


def test_a_measured_peak_decides_the_fit_instead_of_the_target():
    tiers = load_tiers()
    t4_tier = next(t for t in tiers if t.preset == "sd21-16gb")
    assert plan("sd21", T4).best == "sd21-16gb"  # on its target
    over = dataclasses.replace(t4_tier, measured_peak_gb=15.6, measured_steps_per_s=1.5, measured_on="H200, 15 GB cap")
    result = plan("sd21", T4, tuple(over if t is t4_tier else t for t in tiers))
    assert result.best == "sd21-lora-8gb"
    assert "measured peak 15.6 GB" in next(r.why for r in result.rows if r.tier.preset == "sd21-16gb")


def test_a_tier_that_ran_out_of_memory_under_its_cap_is_never_picked():
    tiers = load_tiers()
    small = next(t for t in tiers if t.preset == "sd15-8gb")
    failed = dataclasses.replace(small, failed_under_cap="class images ran out at 7.4 GB")
    result = plan("sd15", Card("RTX 3070", 8.0, (8, 6)), tuple(failed if t is small else t for t in tiers))
    assert result.best is None
    assert "class images ran out at 7.4 GB" in next(r.why for r in result.rows if r.tier.preset == "sd15-8gb")
    assert any("does not fit" in n for n in result.notes)


def test_a_bf16_preset_does_not_fit_a_card_without_native_bf16():
    tiers = tuple(dataclasses.replace(t, mixed_precision="bf16") if t.preset == "sd15-12gb" else t
                  for t in load_tiers())
    assert plan("sd15", T4, tiers).best == "sd15-8gb"
    assert plan("sd15", RTX3060, tiers).best == "sd15-12gb"


def test_tier_table_names_valid_presets_and_holds_no_invented_measurements():
    tiers = load_tiers()
    assert {"sd15-8gb", "sd15-12gb", "sd15-24gb", "sd21-16gb", "sd21-lora-8gb"} <= {t.preset for t in tiers}
    for t in tiers:
        assert t.preset in list_presets() and t.family in FAMILIES
        config = load_config(t.preset, {"data": {"class_noun": "dog"}})  # the preset itself is valid
        assert (config.data.resolution, config.train.mixed_precision) == (t.resolution, t.mixed_precision)
        assert t.target_gb <= t.card_gb
        measured = (t.measured_peak_gb, t.measured_steps_per_s, t.measured_on)
        assert all(v is None for v in measured) or all(v is not None for v in measured)
    sdxl = [t for t in tiers if t.family == "sdxl"]
    assert {t.preset for t in sdxl} == {"sdxl-lora", "sdxl-lora-8gb", "sdxl-full-24gb"}
    assert all(t.resolution == 1024 for t in sdxl)
    # every row is measured, or measured and found out of memory (never both)
    assert all((t.measured_peak_gb is None) == (t.failed_under_cap is not None) for t in sdxl)
    for name in ("sdxl-lora", "sdxl-lora-8gb", "sdxl-full-24gb", "sdxl-fast"):
        config = load_config(name, {"data": {"class_noun": "dog"}})
        assert config.model.name == "stabilityai/stable-diffusion-xl-base-1.0" and config.prior.enabled
        assert (config.train.mode, config.train.lora_rank) in (("full", 4), ("lora", 4))
    assert load_config("tiny-xl", {"data": {"class_noun": "dog"}}).model.name == "tiny-random-xl"
    sd21 = load_config("sd21-16gb", {"data": {"class_noun": "dog"}})
    assert (sd21.model.prediction_type, sd21.data.resolution, sd21.train.mode, sd21.prior.enabled) == (
        "v_prediction", 768, "full", True)


@pytest.mark.parametrize("text,gb", [("16GB", 16.0), ("16", 16.0), ("11.5g", 11.5), ("16GiB", 17.179869184),
                                     ("12000MB", 12.0)])
def test_parse_memory(text, gb):
    assert parse_memory(text) == pytest.approx(gb)


@pytest.mark.parametrize("text", ["", "16TB", "-3GB", "0", "lots"])
def test_parse_memory_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="memory size"):
        parse_memory(text)


def test_read_card_reads_the_gpu_and_the_override_keeps_its_capability(monkeypatch):
    props = SimpleNamespace(name="Tesla T4", total_memory=15_835_398_144, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0, raising=False)
    card = read_card()
    assert (card.name, round(card.memory_gb, 2), card.capability, card.bf16) == ("Tesla T4", 15.84, (7, 5), False)
    assert read_card("8GB") == Card("Tesla T4", 8.0, (7, 5))
    # a process capped with set_per_process_memory_fraction plans for its cap
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 0.5, raising=False)
    assert read_card() == Card("Tesla T4 capped at 7.9 GB", props.total_memory / 2e9, (7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert read_card() == CPU
    assert read_card("16GB").memory_gb == 16.0 and read_card("16GB").capability is None


def test_model_family_without_loading_weights(tmp_path):
    assert model_family("tiny-random").family == "tiny" and model_family("toy").family == "toy"
    assert model_family("stabilityai/stable-diffusion-2-1").family == "sd21"
    assert model_family("stable-diffusion-v1-5/stable-diffusion-v1-5").resolution == 512
    assert model_family("nobody/not-cached-model").family == "unknown"
    for cross, family in ((768, "sd15"), (1024, "sd21"), (2048, "other")):
        folder = tmp_path / f"model-{cross}"
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "config.json").write_text(json.dumps(
            {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": cross, "sample_size": 96}))
        found = model_family(str(folder))
        assert (found.family, found.resolution) == (family, 768)


def test_model_family_of_a_single_file_from_its_tensor_shapes(tmp_path):
    from safetensors.torch import save_file

    unet = "model.diffusion_model."
    shape = lambda *size: torch.empty(size, dtype=torch.uint8)  # only the shapes are read
    for cross, family in ((768, "sd15"), (1024, "sd21")):
        path = tmp_path / f"model-{cross}.safetensors"
        text = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" if cross == 768
                else "cond_stage_model.model.token_embedding.weight")
        save_file({unet + "input_blocks.0.0.weight": shape(320, 4, 3, 3),
                   unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": shape(320, cross),
                   "first_stage_model.encoder.conv_in.weight": shape(128, 3, 3, 3),
                   text: shape(49408, cross)}, str(path))
        assert model_family(str(path)).family == family


def test_pick_preset_for_train_preset_auto():
    assert pick_preset("tiny-random", CPU)[0].best == "tiny"
    result, found = pick_preset("stabilityai/stable-diffusion-2-1", T4)
    assert (result.best, found.family, found.resolution) == ("sd21-16gb", "sd21", 768)
    assert pick_preset("random-sd21", T4)[0].best == "sd21-16gb"  # the built-in random SD 2.1
    assert pick_preset("random-sd15", T4)[0].best == "sd15-12gb"  # sd15-24gb needs 23 GB
    result, found = pick_preset("stabilityai/stable-diffusion-xl-base-1.0", RTX4090)
    assert (result.best, found.family, found.resolution) == ("sdxl-full-24gb", "sdxl", 1024)
    assert pick_preset("random-sdxl", RTX3060)[0].best == "sdxl-lora"  # the built-in random SDXL
    assert pick_preset("tiny-random-xl", CPU)[0].best == "tiny-xl"
    with pytest.raises(ConfigError, match="no tier preset fits"):
        pick_preset("stable-diffusion-v1-5/stable-diffusion-v1-5", CPU)


def test_plan_command_prints_the_table_and_the_pick(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--model", "stabilityai/stable-diffusion-2-1", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "best preset: sd21-16gb" in out and "13.94 GB" in out and "capped at 15 GB" in out  # the measured tier
    assert "sd21-lora-8gb" in out and "sd15-12gb" not in out
    assert main(["plan", "--model", "tiny-random"]) == 0
    out = capsys.readouterr().out
    assert "no GPU found" in out and "best preset: tiny" in out
    assert main(["plan", "--model", "stabilityai/stable-diffusion-2-1"]) == 1  # CPU: nothing fits
    assert "best preset: none" in capsys.readouterr().out
    assert main(["plan", "--model", "nobody/uncached", "--gpu-memory", "12GB", "--family", "sd15"]) == 0
    assert "best preset: sd15-12gb" in capsys.readouterr().out
    assert main(["plan", "--model", "nobody/uncached", "--gpu-memory", "12GB", "--family", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "best preset: sdxl-lora" in out and "Stable Diffusion XL" in out and "9.66 GB" in out
    assert main(["plan", "--model", "nobody/uncached", "--gpu-memory", "8GB", "--family", "sdxl"]) == 0
    assert "best preset: sdxl-lora-8gb" in (out := capsys.readouterr().out) and "7.17 GB" in out


def test_train_preset_auto_prints_the_plan_and_trains_with_its_pick(tmp_path, subject_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    assert main(["train", "--preset", "auto", "--model", "tiny-random", "--images", str(subject_dir),
                 "--class-noun", "dog", "--output", str(run), "--steps", "2",
                 "--set", "prior.num_images=2", "--set", "output.sample_images=0"]) == 0
    err = capsys.readouterr().err
    assert "best preset: tiny" in err
    saved = (run / "config.yaml").read_text()
    assert "tiny-random" in saved and (run / "final" / "unet").is_dir()
    # the preset is for the family: a big model on this CPU has none, and training does not start
    assert main(["train", "--preset", "auto", "--model", "random-sd21", "--images", str(subject_dir),
                 "--class-noun", "dog", "--output", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no tier preset fits random-sd21" in err and not (tmp_path / "none").exists()
    assert main(["train", "--preset", "auto", "--images", str(subject_dir), "--class-noun", "dog",
                 "--output", str(tmp_path / "no-model")]) == 2
    assert "--preset auto needs --model" in capsys.readouterr().err
