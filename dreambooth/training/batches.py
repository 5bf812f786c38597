"""Training examples: which subject and class images step k uses, and their latents.

Step k's choices (image order, flips, crops, VAE posterior sample) come from a generator seeded by
(seed, k), so the batch of any step can be rebuilt without replaying earlier steps: this is what
makes resume exact. With a centre crop the VAE posterior of each image and of its mirror image is
computed once (`cache_latents`); sampling from the cached posterior with step k's generator gives
the same latents as encoding afresh.

Several processes (`ranks.Ranks`) draw the same global batch, each computing only its own rows:
the draws of the other rows are made and dropped, so every process's generator stays where one
process's would be, and the rows of all processes together are the one-process batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from dreambooth.data.images import crop_offset, prepare_image, resized_size
from dreambooth.data.masks import prepare_mask
from dreambooth.ranks import Ranks


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


def micro_conditioning(size: tuple[int, int], resolution: int, crop: str,
                       rng: random.Random | None = None) -> torch.Tensor:
    """SDXL's added time ids of one training image: (original height, original width, crop top,
    crop left, target height, target width), fp32 (6,).

    The original size is the photo's own (before the short-side resize), the crop the top-left of
    the square in resized coordinates, as `prepare_image` cuts it (`rng` in the same state gives
    the same random crop). A class image, rendered at the training size, gives (R, R, 0, 0, R, R).
    A mirrored image keeps the coordinates of its crop, as diffusers' SDXL DreamBooth script does.
    """
    left, top = crop_offset(resized_size(size, resolution), resolution, crop, rng or random.Random())
    width, height = size
    return torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32)


ENCODE_ROWS = 8  # images per VAE call when caching; the VAE slices the call into one image at a time


@dataclass
class Posterior:
    """Diagonal Gaussian of the VAE encoder, kept to sample latents cheaply: (C, h, w) each."""

    mean: torch.Tensor
    std: torch.Tensor


class Drawn(NamedTuple):
    """One row of a batch as a latent source draws it."""

    latent: torch.Tensor  # (C, h, w), scaled
    time_ids: torch.Tensor  # (6,) SDXL micro-conditioning
    mask: torch.Tensor | None  # (1, h, w) in [0, 1], 1 = subject; None when the source has no masks


class LatentSource:
    """Gives the scaled latent of image i (optionally mirrored) for a step's generator, and its mask
    on the latent grid when `masks` (PIL L images, one per image: data/masks.py) are given.

    Images are encoded where the VAE is, in its dtype, as it is when the source is made. With several
    processes each encodes its share of the cached posteriors (whole VAE calls of `ENCODE_ROWS`, as one
    process makes them) and they are gathered, so every process holds all of them. Masks are cut
    like their images, and cached beside the posteriors (each image and its mirror) by every process.
    """

    def __init__(self, images: list, vae, resolution: int, *, crop: str, cache: bool, ranks: Ranks = Ranks(),
                 masks: list | None = None):
        self.images, self.vae, self.resolution, self.crop, self.masks = images, vae, resolution, crop, masks
        # centre crops are fixed, so their micro-conditioning is too (random ones: per draw)
        self.centre_ids = [micro_conditioning(image.size, resolution, "center") for image in images]
        self.device, self.dtype = vae.device, vae.dtype
        self.scale = vae.config.scaling_factor
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # diffusers' vae_scale_factor
        self.latent_shape = (vae.config.latent_channels, resolution // factor, resolution // factor)
        vae.enable_slicing()  # encoding's peak is that of one image; the latents are the same
        self._cache: dict[tuple[int, bool], Posterior] = {}
        self._mask_cache: dict[tuple[int, bool], torch.Tensor] = {}
        if cache and crop == "center":
            keys = [(i, flip) for i in range(len(images)) for flip in (False, True)]
            calls = [keys[start : start + ENCODE_ROWS] for start in range(0, len(keys), ENCODE_ROWS)]
            for call in ranks.share(calls):
                self._cache.update(self._encode_many(call))
            if ranks.count > 1:
                self._gather(ranks)
            if masks is not None:
                self._mask_cache = {(i, flip): self._mask(i, flip, None) for i, flip in keys}

    def _gather(self, ranks: Ranks) -> None:
        """Every process's posteriors, by way of the CPU (a pickled CUDA tensor keeps its device index)."""
        mine = {key: (post.mean.cpu(), post.std.cpu()) for key, post in self._cache.items()}
        self._cache = {key: Posterior(mean.to(self.device), std.to(self.device))
                       for key, (mean, std) in ranks.gather(mine).items()}

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

    def _mask(self, index: int, flip: bool, crop_rng: random.Random | None) -> torch.Tensor:
        """Image `index`'s mask (1, h, w) fp32 on the device, cut as `_encode` cuts the image."""
        mask = prepare_mask(self.masks[index], self.resolution, self.latent_shape[1:], crop=self.crop, flip=flip,
                            rng=crop_rng)
        return mask.to(self.device)

    def posteriors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached means and stds stacked (2 N, C, h, w), row 2 i + flip, for the fast step's gather."""
        keys = [(i, flip) for i in range(len(self.images)) for flip in (False, True)]
        return (torch.stack([self._cache[k].mean for k in keys]), torch.stack([self._cache[k].std for k in keys]))

    def time_ids(self) -> torch.Tensor:
        """Micro-conditioning rows (2 N, 6) in the order of `posteriors` (a mirror keeps its crop)."""
        return torch.stack([ids for ids in self.centre_ids for _ in (False, True)])

    def mask_rows(self) -> torch.Tensor | None:
        """Cached masks stacked (2 N, 1, h, w) in the order of `posteriors` (None without masks)."""
        if self.masks is None:
            return None
        return torch.stack([self._mask_cache[(i, flip)] for i in range(len(self.images)) for flip in (False, True)])

    def latent(self, index: int, flip: bool, generator: torch.Generator, keep: bool = True) -> Drawn | None:
        """The scaled latent, its micro-conditioning and its mask; with `keep` false only the
        generator advances, as it would have (another process's row: None, nothing encoded)."""
        post, ids = self._cache.get((index, flip)), self.centre_ids[index]
        if not keep:
            if post is None and self.crop == "random":
                torch.randint(0, 2**31, (1,), generator=generator)
            torch.randn(self.latent_shape if post is None else post.mean.shape, generator=generator)
            return None
        mask = self._mask_cache.get((index, flip))
        if post is None:
            crop_rng = None
            if self.crop == "random":  # only random crops draw, so both paths share one stream
                crop_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
                crop_rng = random.Random(crop_seed)
                ids = micro_conditioning(self.images[index].size, self.resolution, "random", random.Random(crop_seed))
            if self.masks is not None:  # the same crop as the image's: a generator in the same state
                mask = self._mask(index, flip, None if crop_rng is None else random.Random(crop_seed))
            post = self._encode(index, flip, crop_rng)
        noise = torch.randn(post.mean.shape, generator=generator).to(post.mean.device, post.mean.dtype)
        return Drawn((post.mean + post.std * noise) * self.scale, ids, mask)


class FixedLatents(LatentSource):
    """Class images given as latents (the sampler's own, `priors`): each one's latent is its target,
    without noise; the mirror image's is the latent mirrored along its width, which is what the VAE
    gives a mirrored image up to its reconstruction error. Entries from older caches that hold a
    PNG come with their VAE posterior instead (`posteriors`: index -> (plain, mirrored))."""

    def __init__(self, latents: list, vae, resolution: int, posteriors: dict | None = None):
        self.images, self.vae, self.resolution, self.crop, self.masks = latents, vae, resolution, "center", None
        self.centre_ids = [micro_conditioning((resolution, resolution), resolution, "center") for _ in latents]
        self.device, self.dtype = vae.device, vae.dtype
        self.scale = vae.config.scaling_factor
        self.latent_shape = tuple(latents[0].shape) if latents and latents[0] is not None else None
        self._cache, self._mask_cache = {}, {}
        for i, latent in enumerate(latents):
            if latent is None:
                self._cache[(i, False)], self._cache[(i, True)] = posteriors[i]
                continue
            mean = (latent / self.scale).to(self.device, self.dtype)
            for flip in (False, True):
                plain = mean.flip(-1) if flip else mean
                self._cache[(i, flip)] = Posterior(plain, torch.zeros_like(plain))


def class_source(entries: list, vae, resolution: int, *, cache: bool, ranks: Ranks = Ranks()
                 ) -> LatentSource:
    """The class images' latent source from the cache's entries (`priors.class_image_progress`): a
    latent file or, from a cache written before latents were kept, a PNG to encode."""
    from dreambooth.data.images import load_rgb
    from dreambooth.priors import load_class_latent

    pngs = [i for i, path in enumerate(entries) if Path(path).suffix == ".png"]
    if len(pngs) == len(entries):
        return LatentSource([load_rgb(p) for p in entries], vae, resolution, crop="center", cache=cache,
                            ranks=ranks)
    encoded = LatentSource([load_rgb(entries[i]) for i in pngs], vae, resolution, crop="center", cache=True,
                           ranks=ranks)
    posteriors = {i: (encoded._cache[(j, False)], encoded._cache[(j, True)]) for j, i in enumerate(pngs)}
    latents = [None if i in posteriors else load_class_latent(Path(path)) for i, path in enumerate(entries)]
    return FixedLatents(latents, vae, resolution, posteriors)


class Batch(NamedTuple):
    latents: torch.Tensor  # (b, C, h, w): this process's rows
    is_prior: torch.Tensor  # (b,) bool
    time_ids: torch.Tensor  # (b, 6) SDXL micro-conditioning
    rows: torch.Tensor  # (b,) long: the rows' places in the global batch
    size: int  # rows of the global batch (all processes together)
    masks: torch.Tensor | None = None  # (b, 1, h, w) subject masks (class rows: 1); None without masks


def build_batch(step: int, seed: int, instances: LatentSource, classes: LatentSource | None,
                batch_size: int, flip_prob: float, ranks: Ranks = Ranks()) -> Batch:
    """This process's rows of step `step`'s global batch: subject rows first, then class rows
    (each row with its own image's sizes and crop), `batch_size` of each in all. Each process takes
    its contiguous `ranks.rows` of the subject rows and the same of the class rows, so every process
    has as many of each and the mean of their losses is the one-process loss. With subject masks
    the class rows' masks are all 1 (their loss is never masked)."""
    g = step_generator(seed, step, salt=1)
    mine = range(batch_size)[ranks.rows(batch_size)]
    rows, is_prior, time_ids, places, masks = [], [], [], [], []
    sources = [(instances, 0, False)] + ([(classes, 1, True)] if classes is not None else [])
    for offset, (source, salt, prior) in enumerate(sources):
        for j, index in enumerate(pick(len(source.images), batch_size, seed, step, salt)):
            flip = bool(torch.rand((), generator=g) < flip_prob)
            drawn = source.latent(index, flip, g, keep=j in mine)
            if drawn is None:
                continue
            rows.append(drawn.latent)
            time_ids.append(drawn.time_ids)
            is_prior.append(prior)
            places.append(offset * batch_size + j)
            masks.append(drawn.mask)
    stacked = None
    if instances.masks is not None:
        ones = torch.ones((1, *rows[0].shape[1:]), device=rows[0].device)
        stacked = torch.stack([ones if m is None else m for m in masks])  # (b, 1, h, w)
    return Batch(torch.stack(rows), torch.tensor(is_prior), torch.stack(time_ids), torch.tensor(places),
                 batch_size * len(sources), stacked)
