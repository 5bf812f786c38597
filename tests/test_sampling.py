"""Sampling by prompt: the one helper `generate`, `demo` and validation grids share."""
from __future__ import annotations

import numpy as np

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
