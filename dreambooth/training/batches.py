"""Training examples: which subject and class images step k uses, and their latents.

Step k's choices (image order, flips, crops, VAE posterior sample) come from a generator seeded by
(seed, k), so the batch of any step can be rebuilt without replaying earlier steps: this is what
makes resume exact. With a centre crop the VAE posterior of each image and of its mirror image is
computed once (`cache_latents`); sampling from the cached posterior with step k's generator gives
the same latents as encoding afresh.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dreambooth.data.images import prepare_image


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of all random draws of one step (salt separates independent streams)."""
    return torch.Generator("cpu").manual_seed((seed * 7919 + step * 104_729 + salt) % (2**63))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fresh permutation of n items for each pass over them."""
    return torch.randperm(n, generator=step_generator(seed, epoch, salt=17)).tolist()


def pick(n: int, count: int, seed: int, step: int, salt: int) -> list[int]:
    """Indices used at `step` when taking `count` per step through epoch permutations of n items."""
    out = []
    for j in range(step * count, (step + 1) * count):
        epoch, pos = divmod(j, n)
        out.append(epoch_order(n, seed * 31 + salt, epoch)[pos])
    return out


def latents_cached(config) -> bool:
    """Whether a run's subject latents are encoded once (the random-crop step encodes every batch)."""
    return config.train.cache_latents and config.data.crop == "center"


ENCODE_ROWS = 8  # images per VAE call when caching; the VAE slices the call into one image at a time


@dataclass
class Posterior:
    """Diagonal Gaussian of the VAE encoder, kept to sample latents cheaply: (C, h, w) each."""

    mean: torch.Tensor
    std: torch.Tensor


class LatentSource:
    """Gives the scaled latent of image i (optionally mirrored) for a step's generator.

    Images are encoded where the VAE is, in its dtype, as it is when the source is made.
    """

    def __init__(self, images: list, vae, resolution: int, *, crop: str, cache: bool):
        self.images, self.vae, self.resolution, self.crop = images, vae, resolution, crop
        self.device, self.dtype = vae.device, vae.dtype
        self.scale = vae.config.scaling_factor
        vae.enable_slicing()  # encoding's peak is that of one image; the latents are the same
        self._cache: dict[tuple[int, bool], Posterior] = {}
        if cache and crop == "center":
            keys = [(i, flip) for i in range(len(images)) for flip in (False, True)]
            for start in range(0, len(keys), ENCODE_ROWS):
                self._cache.update(self._encode_many(keys[start : start + ENCODE_ROWS]))

    def _encode(self, index: int, flip: bool, crop_rng: random.Random | None) -> Posterior:
        pixels = prepare_image(self.images[index], self.resolution, crop=self.crop, flip=flip, rng=crop_rng)
        return self._posteriors([pixels])[0]

    def _encode_many(self, keys: list[tuple[int, bool]]) -> dict[tuple[int, bool], Posterior]:
        """Centre-cropped images encoded in one VAE call: (index, flip) -> posterior."""
        pixels = [prepare_image(self.images[i], self.resolution, crop="center", flip=flip) for i, flip in keys]
        return dict(zip(keys, self._posteriors(pixels)))

    @torch.no_grad()
    def _posteriors(self, pixels: list[torch.Tensor]) -> list[Posterior]:
        """One VAE call over (3, H, W) images."""
        dist = self.vae.encode(torch.stack(pixels).to(self.device, self.dtype)).latent_dist
        return [Posterior(dist.mean[j], dist.std[j]) for j in range(len(pixels))]

    def posteriors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached means and stds stacked (2 N, C, h, w), row 2 i + flip, for the fast step's gather."""
        keys = [(i, flip) for i in range(len(self.images)) for flip in (False, True)]
        return (torch.stack([self._cache[k].mean for k in keys]), torch.stack([self._cache[k].std for k in keys]))

    def latent(self, index: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
        post = self._cache.get((index, flip))
        if post is None:
            crop_rng = None
            if self.crop == "random":  # only random crops draw, so both paths share one stream
                crop_rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
            post = self._encode(index, flip, crop_rng)
        noise = torch.randn(post.mean.shape, generator=generator).to(post.mean.device, post.mean.dtype)
        return (post.mean + post.std * noise) * self.scale  # (C, h, w)


def build_batch(step: int, seed: int, instances: LatentSource, classes: LatentSource | None,
                batch_size: int, flip_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, h, w) and is_prior (B,) for one step: subject rows first, then class rows."""
    g = step_generator(seed, step, salt=1)
    rows, is_prior = [], []
    sources = [(instances, 0, False)] + ([(classes, 1, True)] if classes is not None else [])
    for source, salt, prior in sources:
        for index in pick(len(source.images), batch_size, seed, step, salt):
            flip = bool(torch.rand((), generator=g) < flip_prob)
            rows.append(source.latent(index, flip, g))
            is_prior.append(prior)
    return torch.stack(rows), torch.tensor(is_prior)
