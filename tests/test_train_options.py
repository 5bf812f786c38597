"""The kohya/OneTrainer-style training options: min-SNR weighting, offset noise, the weights' moving
average (EMA) and the masked loss. Each is checked against a hand computation; the fast/plain
equality with all of them on is in tests/test_fast_path.py, resume with them in tests/test_resume.py."""
import json
import random

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.data.images import check_images, prepare_image
from dreambooth.data.masks import check_masks, prepare_mask, read_mask
from dreambooth.errors import ConfigError, ImageCheckError
from dreambooth.training import events as ev
from dreambooth.training import train
from dreambooth.training.ema import WeightAverage
from dreambooth.training.losses import add_offset_noise, dreambooth_loss, mask_weights, min_snr_weights

REQUIRED = {"data": {"images": "x", "class_noun": "dog"}}


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# --- min-SNR -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_a_hand_computation(scheduler, prediction_type):
    t = torch.tensor([0, 10, 300, 999])
    weights = min_snr_weights(t, scheduler.alphas_cumprod, 5.0, prediction_type)
    for w, step in zip(weights.tolist(), t.tolist()):
        a = float(scheduler.alphas_cumprod[step])
        snr = a / (1 - a)
        expected = min(snr, 5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        assert w == pytest.approx(expected, rel=1e-5), step
    if prediction_type == "epsilon":  # low noise (high SNR) is damped, high noise keeps weight 1
        assert weights[0] < 0.01 and weights[-1] == 1.0


def test_row_weights_scale_each_rows_loss_instance_and_prior_alike():
    target = torch.zeros(4, 1, 1, 2)
    pred = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 1, 2)
    is_prior = torch.tensor([False, False, True, True])
    parts = dreambooth_loss(pred, target, is_prior, 0.5, row_weights=torch.tensor([0.5, 1.0, 0.25, 2.0]))
    assert parts.instance.item() == pytest.approx((0.5 * 1 + 9) / 2)
    assert parts.prior.item() == pytest.approx((0.25 * 4 + 2 * 16) / 2)


def test_min_snr_is_refused_out_of_range():
    with pytest.raises(ConfigError, match="train.min_snr_gamma"):
        load_config("tiny", REQUIRED, ["train.min_snr_gamma=-1"])


# --- offset noise ------------------------------------------------------------------------------

def test_offset_noise_adds_one_constant_per_row_and_channel():
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shifted = add_offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    offset = shifted - noise  # (3, 4, 8, 8), constant over (H, W)
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)
    expected = 0.1 * torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(offset[..., 0, 0], expected[..., 0, 0], atol=1e-6, rtol=0)
    assert offset[..., 0, 0].unique().numel() == 12  # a different constant per row and channel


def test_offset_noise_draws_after_the_steps_other_draws():
    """Rows, latents and timesteps of a step are what they are without offset noise; only the
    noise moves, by a per-channel constant (so resume and the fast/plain equality keep holding)."""
    from dreambooth.training.fast import BatchLayout, draw_step

    plain = draw_step(3, 0, BatchLayout((3, 4), 2, (4, 8, 8), 1000), 0.5)
    offset = draw_step(3, 0, BatchLayout((3, 4), 2, (4, 8, 8), 1000, 0.1), 0.5)
    for a, b in zip(plain[:2] + plain[3:], offset[:2] + offset[3:]):
        assert torch.equal(a, b)
    moved = offset.noise - plain.noise
    assert moved.abs().max() > 0
    assert torch.allclose(moved, moved[..., :1, :1].expand_as(moved), atol=1e-6)


# --- EMA ---------------------------------------------------------------------------------------

def test_weight_average_follows_the_hand_computed_average():
    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    start = layer.weight.detach().clone()
    average = WeightAverage({"unet": layer, "text_encoder": frozen}, 0.9)
    assert average.names == ["unet.weight", "unet.bias"]  # only what trains
    expected = start.clone()
    for k in range(5):
        with torch.no_grad():
            layer.weight.copy_(start + (k + 1) * 0.1 * torch.ones_like(start) + k ** 2 * 0.01)
        average.update()
        expected = 0.9 * expected + 0.1 * layer.weight.detach()
    torch.testing.assert_close(average.state_dict()["unet.weight"], expected, rtol=1e-6, atol=1e-7)
    trained = layer.weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.weight.detach(), trained)  # the trained weights are back exactly
    restored = WeightAverage({"unet": torch.nn.Linear(3, 2)}, 0.9)
    restored.load_state_dict(average.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.average, average.average))
    with pytest.raises(KeyError, match="missing"):
        restored.load_state_dict({"unet.weight": expected})


def test_weight_average_of_bf16_weights_is_kept_in_fp32():
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    average = WeightAverage({"unet": layer}, 0.999)
    assert all(a.dtype == torch.float32 for a in average.average)
    average.update()
    assert all(a.dtype == torch.float32 for a in average.average)


def test_ema_decay_of_one_is_refused():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config("tiny", REQUIRED, ["train.ema_decay=1"])


def test_samples_scoring_and_final_use_the_weight_average(tmp_path, subject_dir, monkeypatch):
    """Validation grids and checkpoint scoring see the average (and training goes on from the
    trained weights); final/ holds the last average, not the trained weights."""
    import dreambooth.training.scoring as scoring
    from dreambooth.training import loop

    seen = {"samples": {}, "scores": {}}

    def unet_weights(components):
        return {k: v.detach().clone() for k, v in components.unet.named_parameters()}

    real_samples = loop.write_samples

    def write_samples(components, config, run, step):
        seen["samples"][step] = unet_weights(components)
        return real_samples(components, config, run, step)

    def score(components, config, step, scorer, samples):
        seen["scores"][step] = unet_weights(components)
        return {"step": step, "fidelity": 0.5, "prompt_fidelity": 0.9, "drift": 0.0}

    monkeypatch.setattr(loop, "write_samples", write_samples)
    monkeypatch.setattr(scoring, "build_checkpoint_scorer", lambda *a, **k: object())
    monkeypatch.setattr(scoring, "score_checkpoint", score)
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.steps=4", "train.ema_decay=0.5", "output.checkpoint_every=2",
                          "output.keep_checkpoints=5", "output.sample_every=2", "eval.every=2", "train.device=cpu"])
    assert isinstance(train(config, tmp_path / "run"), ev.Finished)
    checkpoints = tmp_path / "run" / "checkpoints"
    final = load_file(tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    for step in (2, 4):
        average = load_file(checkpoints / f"step-{step:05d}" / "ema.safetensors")
        trained = load_file(checkpoints / f"step-{step:05d}" / "trainable.safetensors")
        assert average.keys() == trained.keys()
        assert any(not torch.equal(average[k], trained[k]) for k in average)
        for k, v in average.items():
            name = k[len("unet."):]
            assert torch.equal(seen["samples"][step][name], v), (step, k)
            assert torch.equal(seen["scores"][step][name], v), (step, k)
            if step == 4:
                assert torch.equal(final[name], v), k
    info = json.loads((tmp_path / "run" / "final" / "dreambooth.json").read_text())
    assert info["ema_decay"] == 0.5


# --- masked loss -------------------------------------------------------------------------------

def test_background_weight_zero_ignores_the_background_of_subject_rows():
    """With the background weighted 0 the loss and its gradient do not depend on anything outside
    the subject's cells of a subject row; class rows (mask 1) keep the plain loss."""
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    masks = torch.ones(2, 1, 4, 4)
    masks[0, :, :, 2:] = 0  # subject row: right half is background
    weights = mask_weights(masks, 0.0)
    is_prior = torch.tensor([False, True])

    def loss(p, t):
        p = p.clone().requires_grad_(True)
        parts = dreambooth_loss(p, t, is_prior, 1.0, pixel_weights=weights)
        parts.total.backward()
        return parts, p.grad

    parts, grad = loss(pred, target)
    changed_pred, changed_target = pred.clone(), target.clone()
    changed_pred[0, :, :, 2:] += 5.0
    changed_target[0, :, :, 2:] -= 3.0
    again, grad_again = loss(changed_pred, changed_target)
    assert torch.equal(parts.total, again.total) and torch.equal(grad, grad_again)
    assert grad[0, :, :, 2:].abs().max() == 0
    subject = ((pred[0, :, :, :2] - target[0, :, :, :2]) ** 2).mean()  # normalised by the mean weight
    torch.testing.assert_close(parts.instance, subject)
    torch.testing.assert_close(parts.prior, ((pred[1] - target[1]) ** 2).mean())


def test_a_constant_pixel_weight_is_the_plain_loss():
    pred, target = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    is_prior = torch.tensor([False, False, True])
    plain = dreambooth_loss(pred, target, is_prior, 1.0)
    weighted = dreambooth_loss(pred, target, is_prior, 1.0, pixel_weights=torch.full((3, 1, 4, 4), 0.3))
    torch.testing.assert_close(weighted.total, plain.total)


def subject_photo(size=(96, 64)) -> tuple[Image.Image, Image.Image]:
    """An RGB photo with a red subject left of centre on grey, and its mask (255 on the subject)."""
    photo, mask = Image.new("RGB", size, (128, 128, 128)), Image.new("L", size, 0)
    box = (10, 8, 50, 56)
    ImageDraw.Draw(photo).rectangle(box, fill=(255, 0, 0))
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return photo, mask


@pytest.mark.parametrize("crop,flip", [("center", False), ("center", True), ("random", False), ("random", True)])
def test_a_mask_is_cut_and_mirrored_as_its_photo(crop, flip):
    photo, mask = subject_photo()
    pixels = prepare_image(photo, 48, crop=crop, flip=flip, rng=random.Random(7))
    cut = prepare_mask(mask, 48, (48, 48), crop=crop, flip=flip, rng=random.Random(7))[0]  # pixel grid
    red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # the subject's pixels in the training image
    assert red.any() and ((cut > 0.5) == red).float().mean() > 0.99
    latent = prepare_mask(mask, 48, (6, 6), crop=crop, flip=flip, rng=random.Random(7))
    assert latent.shape == (1, 6, 6) and 0 <= latent.min() and latent.max() <= 1
    torch.testing.assert_close(latent[0], cut.view(6, 8, 6, 8).mean(dim=(1, 3)))  # area average


def write_masked_photos(folder, source):
    """Three photos with masks: RGBA with the mask as alpha, or RGB with <stem>.mask.png beside."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        photo, mask = subject_photo()
        if source == "alpha":
            rgba = photo.convert("RGBA")
            rgba.putalpha(mask)
            rgba.save(folder / f"dog{i}.png")
        else:
            photo.save(folder / f"dog{i}.png")
            mask.save(folder / f"dog{i}.mask.png")
    return folder


def test_alpha_and_file_masks_load_alike_and_mask_files_are_no_photos(tmp_path):
    alpha, files = write_masked_photos(tmp_path / "alpha", "alpha"), write_masked_photos(tmp_path / "files", "files")
    report = check_images(files, 64)
    assert [i.path.name for i in report.images] == ["dog0.png", "dog1.png", "dog2.png"]
    for folder, source in ((alpha, "alpha"), (files, "files")):
        check_masks(check_images(folder, 64).images, source)
    a, b = read_mask(alpha / "dog1.png", "alpha"), read_mask(files / "dog1.png", "files")
    assert np.array_equal(np.array(a), np.array(b)) and np.array(a).max() == 255


def test_cached_masks_follow_the_flip_of_each_row(tmp_path):
    from dreambooth.data.masks import load_masks
    from dreambooth.models import load_components
    from dreambooth.training.batches import LatentSource, build_batch

    folder = write_masked_photos(tmp_path / "p", "files")
    images = check_images(folder, 64).images
    vae = load_components("tiny-random").vae
    photos = [Image.open(i.path).convert("RGB") for i in images]
    source = LatentSource(photos, vae, 64, crop="center", cache=True, masks=load_masks(images, "files"))
    rows = source.mask_rows()  # (2 N, 1, h, w): each image, then its mirror
    h = source.latent_shape[1]
    assert rows.shape == (6, 1, h, h)
    assert torch.equal(rows[1], rows[0].flip(-1)) and not torch.equal(rows[0], rows[1])
    assert rows[0, 0, :, : h // 2].sum() > rows[0, 0, :, h // 2 :].sum()  # the subject sits left
    classes = LatentSource(photos, vae, 64, crop="center", cache=True)  # class images carry no masks
    batch = build_batch(0, 0, source, classes, 3, 0.5)  # subject rows masked, class rows all 1
    assert batch.masks.shape == (6, 1, h, h) and torch.equal(batch.masks[3:], torch.ones(3, 1, h, h))
    assert all(any(torch.equal(m, r) for r in rows) for m in batch.masks[:3])


def test_bad_masks_are_named_before_training_starts(tmp_path):
    files = write_masked_photos(tmp_path / "files", "files")
    (files / "dog0.mask.png").unlink()
    Image.new("L", (50, 50), 255).save(files / "dog1.mask.png")
    Image.new("L", (96, 64), 0).save(files / "dog2.mask.png")
    with pytest.raises(ImageCheckError) as info:
        check_masks(check_images(files, 64).images, "files")
    text = info.value.report()
    assert "dog0.mask.png: is missing" in text and "data.masks=none" in text
    assert "dog1.mask.png: is 50x50, but its photo dog1.png is 96x64" in text
    assert "dog2.mask.png: is all black" in text

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        subject_photo()[0].save(rgb / f"dog{i}.png")
    opaque = subject_photo()[0].convert("RGBA")
    opaque.save(rgb / "dog2.png")
    config = load_config("tiny", {"data": {"images": str(rgb), "class_noun": "dog"}},
                         ["data.masks=alpha", "train.mask_background_weight=0.1"])
    with pytest.raises(ImageCheckError) as info:
        train(config, tmp_path / "run")
    text = info.value.report()
    assert "dog0.png: has no alpha channel (RGB)" in text and "dog1.png: has no alpha channel" in text
    assert "dog2.png: has an alpha channel, but it is fully opaque" in text
    assert not (tmp_path / "run").exists()  # refused before the run directory or any weights


def test_masks_and_their_background_weight_go_together():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", REQUIRED, ["train.mask_background_weight=0.5"])
    assert [p.where for p in info.value.problems] == ["train.mask_background_weight"]
    with pytest.raises(ConfigError) as info:
        load_config("tiny", REQUIRED, ["data.masks=alpha"])
    assert [p.where for p in info.value.problems] == ["data.masks"]
    with pytest.raises(ConfigError, match="data.masks"):
        load_config("tiny", REQUIRED, ["data.masks=depth", "train.mask_background_weight=0.5"])
    config = load_config("tiny", REQUIRED, ["data.masks=files", "train.mask_background_weight=0"])
    assert config.data.masks == "files" and config.train.mask_background_weight == 0
