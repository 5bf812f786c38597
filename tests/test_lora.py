"""LoRA weights saved by training load back (through diffusers) to the same model.

The adapters start non-zero here: peft's default leaves lora_B at zero, and a zero LoRA would pass
any save/load test.
"""
import numpy as np
import torch

from dreambooth.config import load_config
from dreambooth.formats.lora import load_lora_into_pipeline
from dreambooth.generate import LORA_FILE
from dreambooth.models import load_components
from dreambooth.sampling import make_pipeline, sample_images
from dreambooth.training.outputs import save_lora_weights
from dreambooth.training.setup import mark_trainable


def render(pipe):
    return np.asarray(sample_images(pipe, ["a photo of sks dog"], [0], steps=3, guidance=5.0, resolution=64)[0],
                      dtype=np.float32)


def randomise_lora(module, generator):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def test_lora_saved_and_reloaded_gives_the_same_images(tmp_path):
    config = load_config("tiny-lora", {"data": {"class_noun": "dog", "images": "x"}},
                         ["train.train_text_encoder=true", "train.lora_rank=4", "train.lora_alpha=8"])
    trained = load_components("tiny-random")
    mark_trainable(trained, config.train)
    g = torch.Generator().manual_seed(0)
    randomise_lora(trained.unet, g)
    randomise_lora(trained.text_encoder, g)
    expected = render(make_pipeline(trained))

    save_lora_weights(trained, config, tmp_path)
    assert (tmp_path / LORA_FILE).exists()
    base_pipe = make_pipeline(load_components("tiny-random"))
    base = render(base_pipe)
    load_lora_into_pipeline(base_pipe, tmp_path / LORA_FILE)
    reloaded = render(base_pipe)

    assert np.abs(expected - base).mean() > 1.0  # the LoRA really changes the picture
    np.testing.assert_allclose(reloaded, expected, atol=1.0)  # PNG-level: within one grey level
    # alpha != rank: the scale alpha/rank = 2 must survive the file (it is in the metadata)
