"""Sampling by prompt: the one helper `generate`, `demo` and validation grids share."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
def test_parked_text_encoders_give_the_same_images(model, negative, monkeypatch):
    """The lean presets encode the prompts first and keep the text encoders on the CPU while the
    UNet denoises: the same images as the pipeline encoding them itself (to the rounding of another
    batch size), and the encoders come back."""
    components = load_components(model)
    pipe = make_pipeline(components, "ddim")
    options = dict(steps=2, guidance=5.0, resolution=64, negative_prompt=negative, batch_size=2)
    prompts, seeds = ["a photo of sks dog", "a dog on the moon", "a dog"], [3, 7, 9]
    plain = sample_images(pipe, prompts, seeds, **options)
    moves, to = [], torch.nn.Module.to
    encoders = {id(e): name for name, e in (("te1", components.text_encoder), ("te2", components.text_encoder_2))}

    def spy(module, *args, **kwargs):
        if id(module) in encoders:
            moves.append((encoders[id(module)], str(args[0] if args else kwargs.get("device"))))
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    parked = sample_images(pipe, prompts, seeds, park_text_encoders=True, **options)
    assert len(parked) == len(plain)
    for a, b in zip(parked, plain):  # all prompts are encoded in one batch here: batching rounds, +-1
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    expected = [name for name in ("te1", "te2") if name in encoders.values() and (name == "te1" or components.is_xl)]
    assert moves == [(name, "cpu") for name in expected] + [(name, "cpu") for name in expected]  # parked, back
