"""Sampling by prompt: the one helper `generate`, `demo` and validation grids share."""
from __future__ import annotations

import numpy as np
import pytest

from dreambooth.models import load_components
from dreambooth.sampling import make_pipeline, sample_images, sample_per_prompt


def test_sample_per_prompt_gives_each_prompt_every_seed():
    pipe = make_pipeline(load_components("tiny-random"), "ddim")
    options = dict(steps=2, guidance=5.0, resolution=64)
    rows = sample_per_prompt(pipe, ["a photo of sks dog", "a dog on the moon"], [3, 7], batch_size=3, **options)
    assert [len(row) for row in rows] == [2, 2]
    for prompt, row in zip(["a photo of sks dog", "a dog on the moon"], rows):
        for seed, image in zip([3, 7], row):  # the image of rendering that pair alone (batching rounds: +-1)
            alone = sample_images(pipe, [prompt], [seed], **options)[0]
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert np.abs(np.asarray(rows[0][0], dtype=int) - np.asarray(rows[0][1], dtype=int)).max() > 10


@pytest.mark.parametrize("model,negative", [("tiny-random", ""), ("tiny-random", "blurry"), ("tiny-random-xl", ""),
                                            ("tiny-random-xl", "blurry")])
def test_prompts_encoded_first_give_the_same_images(model, negative):
    """Text encoders kept on the CPU (train.offload_frozen on CUDA) encode the prompts there and the
    pipeline gets their embeddings: the same images as the pipeline encoding them itself (to the
    rounding of another batch size), each distinct prompt encoded once per pipeline."""
    pipe = make_pipeline(load_components(model), "ddim")
    options = dict(steps=2, guidance=5.0, resolution=64, negative_prompt=negative, batch_size=2)
    prompts, seeds = ["a photo of sks dog", "a dog on the moon", "a photo of sks dog"], [3, 7, 9]
    plain = sample_images(pipe, prompts, seeds, **options)
    assert not vars(pipe).get("_encoded_prompts")  # auto: the encoders are on the pipeline's device
    first = sample_images(pipe, prompts, seeds, encode_first=True, **options)
    assert len(vars(pipe)["_encoded_prompts"]) == 2
    assert len(first) == len(plain)
    for a, b in zip(first, plain):  # one prompt per encoder call here: batching rounds, +-1
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_a_split_sampling_pipeline_computes_where_its_unet_is():
    """Text encoders kept elsewhere (the CPU, while the UNet is on the card) must not decide where
    the pipeline computes; diffusers before 2026-08 took `text_encoder`'s device for the whole."""
    import torch

    components = load_components("tiny-random")
    pipe = make_pipeline(components, "ddim")
    components.text_encoder.to("meta")  # stands for "not where the UNet is" on a machine without a GPU
    assert pipe._execution_device == torch.device("cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
