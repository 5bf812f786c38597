"""SDXL training and generation on the tiny SDXL architecture (tiny-random-xl, CPU).

Full and LoRA runs end to end, both text encoders trained, micro-conditioning values, the fast
step equal to the plain step, resume equal to an uninterrupted run, and the fp16 VAE overflow
guard. Run with `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_sdxl_training.py -q`.
"""
import json
import random
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.data.images import prepare_image
from dreambooth.errors import ModelSourceError
from dreambooth.generate import GenerationSettings, generate
from dreambooth.models import builtin_path, load_components
from dreambooth.priors import cached_class_images, class_image_key
from dreambooth.training import events as ev
from dreambooth.training import train
from dreambooth.training.batches import LatentSource, build_batch, micro_conditioning

XL = "model.name=tiny-random-xl"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three 96x64 photos (wider than tall): at 64 px the centre crop starts 16 px from the left."""
    from dreambooth.toyworld import render_subject

    folder = tmp_path_factory.mktemp("subject")
    for i, context in enumerate(["plain", "table", "city"]):
        render_subject("dog", context, seed=i).resize((96, 64)).save(folder / f"dog{i}.png")
    return folder


def xl_config(photos, preset="tiny", *extra):
    return load_config(preset, {"data": {"images": str(photos), "class_noun": "dog"}},
                       [XL, "train.steps=3", "output.checkpoint_every=0", "train.device=cpu", *extra])


def xl_run(tmp_path, photos, name, preset="tiny", *extra):
    config = xl_config(photos, preset, *extra)
    events = []
    last = train(config, tmp_path / name, on_event=events.append)
    assert isinstance(last, ev.Finished), last
    return tmp_path / name, events


def final_state(run, lora):
    final = run / "final"
    if lora:
        return load_file(final / "pytorch_lora_weights.safetensors")
    out = {}
    for part, file in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")]:
        out.update({f"{part}.{k}": v for k, v in load_file(final / part / f"{file}.safetensors").items()})
    return out


def test_full_run_writes_an_sdxl_pipeline_folder_that_generates(tmp_path, photos):
    from diffusers import StableDiffusionXLPipeline

    run, _ = xl_run(tmp_path, photos, "full")
    pipe = StableDiffusionXLPipeline.from_pretrained(run / "final")
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert (run / "samples" / "step-00003.png").exists()


def test_lora_run_with_both_text_encoders_loads_into_the_base_sdxl_pipeline(tmp_path, photos):
    from diffusers import StableDiffusionXLPipeline

    run, _ = xl_run(tmp_path, photos, "lora", "tiny-lora", "train.train_text_encoder=true")
    keys = load_file(run / "final" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_path("tiny-random-xl"))

    def render():
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    base = render()
    pipe.load_lora_weights(str(run / "final"), weight_name="pytorch_lora_weights.safetensors")
    tuned = render()
    assert np.isfinite(tuned).all() and not np.array_equal(base, tuned)  # the adapters took effect


def test_generate_renders_from_sdxl_run_directories(tmp_path, photos):
    for mode, preset in [("full", "tiny"), ("lora", "tiny-lora")]:
        run, _ = xl_run(tmp_path, photos, mode, preset, "output.sample_images=0")
        paths = generate(run, ["a photo of {identifier} {class}"], tmp_path / f"out-{mode}", num=1,
                         settings=GenerationSettings(steps=2))
        assert np.asarray(Image.open(paths[0])).std() > 0, mode


def test_train_text_encoder_trains_both_encoders(tmp_path, photos):
    base = load_components("tiny-random-xl")
    trained, _ = xl_run(tmp_path, photos, "te", "tiny", "train.train_text_encoder=true")
    frozen, _ = xl_run(tmp_path, photos, "no-te", "tiny")
    for name in ("text_encoder", "text_encoder_2"):
        before = getattr(base, name).state_dict()
        for run, changes in [(trained, True), (frozen, False)]:
            after = load_file(run / "final" / name / "model.safetensors")
            weight = next(k for k in after if k.endswith("layers.0.self_attn.q_proj.weight"))
            own = weight if weight in before else weight.removeprefix("text_model.")
            assert torch.equal(before[own], after[weight]) != changes, (name, run.name)


def test_micro_conditioning_of_subject_photos_and_class_images():
    """(original h, original w, crop top, crop left, target h, target w) per row: a subject photo's
    own size and crop, a class image's (R, R, 0, 0, R, R), never each other's (diffusers #7239/#7242
    gave class images the subject's values)."""
    vae = load_components("tiny-random-xl").vae
    photo = Image.new("RGB", (150, 100), "gray")  # resized to 96x64 at 64 px
    instances = LatentSource([photo], vae, 64, crop="center", cache=True)
    classes = LatentSource([Image.new("RGB", (64, 64), "white")], vae, 64, crop="center", cache=True)
    batch = build_batch(0, 0, instances, classes, 1, flip_prob=0.5)
    is_prior, time_ids = batch.is_prior, batch.time_ids
    assert is_prior.tolist() == [False, True]
    assert time_ids.tolist() == [[100, 150, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert instances.time_ids().tolist() == [[100, 150, 0, 16, 64, 64]] * 2  # a mirror keeps its crop


def test_random_crop_micro_conditioning_names_the_crop_that_was_cut():
    """A random crop's coordinates are those of the square `prepare_image` cut with the same draws."""
    rng_image = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    photo = Image.fromarray(rng_image)
    for seed in range(5):
        ids = micro_conditioning(photo.size, 64, "random", random.Random(seed))
        top, left = int(ids[2]), int(ids[3])
        pixels = prepare_image(photo, 64, crop="random", rng=random.Random(seed))
        resized = photo.resize((96, 64), Image.Resampling.LANCZOS, reducing_gap=3.0)
        expected = prepare_image(resized.crop((left, top, left + 64, top + 64)), 64)
        assert torch.equal(pixels, expected), seed


def test_the_unet_gets_each_rows_micro_conditioning_and_pooled_text(tmp_path, photos, monkeypatch):
    import dreambooth.training.prepare as prepare

    seen = []

    def loaded(*args, **kwargs):
        components = load_components(*args, **kwargs)

        def hook(module, args, kwargs):
            if torch.is_grad_enabled():  # training steps, not class-image sampling
                seen.append(kwargs["added_cond_kwargs"])
        components.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return components
    monkeypatch.setattr(prepare, "load_components", loaded)
    xl_run(tmp_path, photos, "hooked", "tiny", "output.sample_images=0")
    assert seen and all(c["time_ids"].tolist() == [[64, 96, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]] for c in seen)
    assert seen[0]["text_embeds"].shape == (2, 32)  # text_encoder_2's projection width


@pytest.mark.parametrize("preset,extra", [("tiny", ["train.train_text_encoder=true"]),
                                          ("tiny-lora", ["train.train_text_encoder=true", "train.batch_size=2"])])
def test_fast_step_equals_plain_step_on_cpu(tmp_path, photos, preset, extra):
    plain, _ = xl_run(tmp_path, photos, "plain", preset, "train.fast=never", "output.sample_images=0", *extra)
    fast, events = xl_run(tmp_path, photos, "fast", preset, "train.fast=always", "output.sample_images=0", *extra)
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in events)
    assert logged_losses(plain) == logged_losses(fast)
    a, b = final_state(plain, "lora" in preset), final_state(fast, "lora" in preset)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logged_losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("preset", ["tiny", "tiny-lora"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, photos, preset):
    config = xl_config(photos, preset, "train.steps=4", "train.train_text_encoder=true", "output.sample_images=0")
    assert isinstance(train(config, tmp_path / "straight"), ev.Finished)
    stop = threading.Event()
    stopped = train(config, tmp_path / "resumed", stop=stop,
                    on_event=lambda e: stop.set() if isinstance(e, ev.StepDone) and e.step == 2 else None)
    assert isinstance(stopped, ev.Stopped) and stopped.step == 2
    assert any(k.startswith("text_encoder_2.") for k in
               load_file(tmp_path / "resumed" / "checkpoints" / "step-00002" / "trainable.safetensors"))
    assert isinstance(train(config, tmp_path / "resumed", resume=True), ev.Finished)
    lora = preset == "tiny-lora"
    a, b = final_state(tmp_path / "straight", lora), final_state(tmp_path / "resumed", lora)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def overflowing_xl(tmp_path_factory):
    """tiny-random-xl with VAE weights scaled so that fp16 activations pass 65504 (as SDXL's own VAE
    does at 1024 px): the encoder's first convolution by 1e5 (outputs up to ~1.5e5 on pixels in
    [-1, 1], weights still ~2e4), the decoder's by 1e4 (~1.8e5 on latents / scaling factor). The
    GroupNorm after each brings fp32 activations back to unit size, so in fp32 the VAE works."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(builtin_path("tiny-random-xl"), folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.weight.mul_(1e4)
    vae.save_pretrained(folder / "vae")
    return folder


def test_the_provoked_overflow_gives_nan_in_fp16(overflowing_xl):
    """The control: without fp32 the VAE of `overflowing_xl` gives NaN both ways."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(overflowing_xl / "vae", torch_dtype=torch.float16)
    pixels = torch.zeros(1, 3, 64, 64, dtype=torch.float16).uniform_(-1, 1)
    assert not torch.isfinite(vae.encode(pixels).latent_dist.mean).all()
    latents = torch.randn(1, 4, 8, 8) / vae.config.scaling_factor
    assert not torch.isfinite(vae.decode(latents.half()).sample).all()
    assert torch.isfinite(vae.float().decode(latents).sample).all()
    assert torch.isfinite(vae.encode(pixels.float()).latent_dist.mean).all()


def test_fp16_training_with_an_overflowing_sdxl_vae_gives_finite_latents_and_images(tmp_path, photos,
                                                                                    overflowing_xl, monkeypatch):
    """Without the guard (the VAE in fp16 like the text encoders; decoding under the samples'
    fp16 autocast) the cached latents are NaN, so is every loss and the loss scaler skips every
    step; the class images and samples decode to NaN, i.e. black."""
    monkeypatch.setenv("DREAMBOOTH_CPU_FP16", "1")
    extra = (f"model.name={overflowing_xl}", "train.mixed_precision=fp16", "train.steps=2")
    run, _ = xl_run(tmp_path, photos, "fp16", "tiny", *extra)
    steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps and all(np.isfinite(r["loss"]) and not r["skipped"] for r in steps)
    tile = np.asarray(Image.open(run / "samples" / "step-00002.png"))[2:66, 2:66]  # the first image, inside the padding
    assert tile.max() > 0 and tile.std() > 0  # a NaN decode is black
    classes = cached_class_images(class_image_key(overflowing_xl, xl_config(photos, "tiny", *extra)))
    assert classes and all(np.asarray(Image.open(p)).max() > 0 for p in classes)


def test_an_fp16_fix_vae_replaces_the_models_and_stays_fp16(tmp_path, photos, monkeypatch):
    from dreambooth.training.prepare import frozen_dtype_of, vae_dtype

    components = load_components("tiny-random-xl")
    fixed = tmp_path / "fp16-fix-vae"
    components.vae.register_to_config(force_upcast=False)
    components.vae.save_pretrained(fixed)
    assert vae_dtype(load_components("tiny-random-xl"), frozen_dtype_of("fp16")) == torch.float32
    from dreambooth.models.vae import load_vae

    components.vae = load_vae(str(fixed), load_components("tiny-random-xl").vae)
    assert vae_dtype(components, frozen_dtype_of("fp16")) == torch.float16
    run, _ = xl_run(tmp_path, photos, "fixed-vae", "tiny-lora", f"model.vae={fixed}")
    assert '"vae"' in (run / "final" / "dreambooth.json").read_text()


def test_an_unusable_vae_is_a_clear_error(tmp_path):
    from diffusers import AutoencoderKL

    from dreambooth.models.vae import load_vae, vae_folder

    base = load_components("tiny-random-xl").vae
    with pytest.raises(ModelSourceError) as missing:
        vae_folder(str(tmp_path / "nowhere"))
    assert "model.vae" in missing.value.report()
    other = tmp_path / "other"
    AutoencoderKL(**{**dict(base.config), "latent_channels": 8}).save_pretrained(other)
    with pytest.raises(ModelSourceError) as wrong:
        load_vae(str(other), base)
    assert "latent_channels 8" in wrong.value.report()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_every_trainable_text_encoder_parameter_gets_a_gradient(mode):
    """A multi-GPU (DDP) run fails on trainable parameters that took no part in the loss; the first
    encoder's last layer and final norm are such (the UNet reads its penultimate hidden states)."""
    from dreambooth.training.setup import mark_trainable
    from dreambooth.training.state import PromptEmbeddings, text_encoders_of

    components = load_components("tiny-random-xl")
    config = xl_config(".", "tiny" if mode == "full" else "tiny-lora", "train.train_text_encoder=true")
    modules = mark_trainable(components, config.train)
    context, pooled = PromptEmbeddings(components, config, torch.device("cpu")).encode(text_encoders_of(modules))
    (context.square().mean() + pooled.square().mean()).backward()
    for name in ("text_encoder", "text_encoder_2"):
        trainable = [(n, p) for n, p in modules[name].named_parameters() if p.requires_grad]
        assert trainable and [n for n, p in trainable if p.grad is None] == [], name


def test_offload_frozen_parks_both_sdxl_text_encoders():
    from dreambooth.training.state import FrozenParking

    components = load_components("tiny-random-xl")
    config = xl_config(".", "tiny", "train.offload_frozen=true")
    parking = FrozenParking(components, config, torch.device("cpu"), park_to="meta")
    assert parking.modules == [components.vae, components.text_encoder, components.text_encoder_2]
