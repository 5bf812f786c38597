"""Sampling: diffusers pipelines over loaded components with the sampler the user asked for,
seeded batches of images (per prompt), `torch.compile` with a persistent cache, and contact-sheet grids.

Inductor caches compiled graphs in `$TMPDIR/torchinductor_<user>` unless told otherwise, which a
reboot (or a fresh notebook) empties; its cache is what makes the second compile of the same UNet
cheap, so it lives under `cache_root()/inductor`. A `TORCHINDUCTOR_CACHE_DIR` set by the user wins.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Iterator

import torch
from PIL import Image

from dreambooth.models import cache_root

SAMPLER_CLASSES = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}
SAMPLERS = tuple(SAMPLER_CLASSES)
DEFAULT_SAMPLER = "dpmpp"


def make_scheduler(name: str, base_config: dict):
    """A sampler configured with the base model's betas and prediction type."""
    import diffusers

    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_CLASSES)}")
    cls_name, extra = SAMPLER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(dict(base_config), **extra)


def make_pipeline(components, sampler: str = DEFAULT_SAMPLER, *, device: torch.device | str | None = None,
                  compile_unet: bool = False, graphed: torch.dtype | None = None):
    """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over the given (possibly
    LoRA-wrapped) components; no copies made unless asked.

    `compile_unet`: sample through `torch.compile(unet)` (the module itself stays as it is).
    `graphed` (CUDA): sample through CUDA graphs of the UNet in that dtype, a copy when the UNet is
    in another (`sampler_unet.sampling_unet`); compilation wins when both are asked.
    """
    unet = None
    if compile_unet:
        unet = compiled(components.unet)
    elif graphed is not None:
        from dreambooth.sampler_unet import sampling_unet

        unet = sampling_unet(components.unet, graphed)
    pipe = pipeline_of(components, make_scheduler(sampler, components.noise_scheduler.config), unet=unet)
    pipe.__class__ = _on_unet_device(type(pipe))
    pipe.set_progress_bar_config(disable=True)
    components.vae.enable_slicing()  # a batch decodes one image at a time: the same images, one image's peak
    if device is not None:
        pipe.to(device)
    return pipe


@functools.cache
def _on_unet_device(base: type) -> type:
    """`base` computing where its UNet is. Text encoders kept on the CPU (`train.offload_frozen` on
    CUDA) split the pipeline, and diffusers before 2026-08 (huggingface/diffusers#14383) took the
    first component's device, `text_encoder`'s, for all of it. Sampling pipelines only: saved ones
    keep their class, whose name model_index.json records."""

    def execution_device(self):
        return _device_of(self.unet) or base._execution_device.fget(self)

    return type(base.__name__, (base,), {"_execution_device": property(execution_device),
                                         "__module__": base.__module__})


def pipeline_of(components, scheduler, *, unet=None):
    """The diffusers pipeline object over the components (SDXL: StableDiffusionXLPipeline, no
    watermarker; SD: no safety checker); `unet` in place of theirs when given."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  unet=components.unet if unet is None else unet, scheduler=scheduler)
    if components.is_xl:
        return StableDiffusionXLPipeline(**common, text_encoder_2=components.text_encoder_2,
                                         tokenizer_2=components.tokenizer_2, add_watermarker=False)
    return StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def decodes_in_fp32(pipe) -> bool:
    """SDXL with a VAE that overflows fp16 (its config's `force_upcast`): decode outside autocast in fp32."""
    return hasattr(pipe, "text_encoder_2") and bool(getattr(pipe.vae.config, "force_upcast", False))


def decode_fp32(pipe, latents: torch.Tensor) -> list:
    """PIL images from an SDXL pipeline's latents, decoded in fp32 with autocast off.

    The pipeline upcasts an fp16 VAE itself, but inside `sampling_precision`'s autocast its
    convolutions would still run in fp16 and overflow to NaN (black images).
    """
    vae = pipe.vae
    before = vae.dtype
    with torch.autocast(latents.device.type, enabled=False):
        if before != torch.float32:
            vae.to(torch.float32)
        try:
            image = vae.decode(_unscaled(vae.config, latents.float()), return_dict=False)[0]
        finally:
            if before != torch.float32:
                vae.to(before)
    return pipe.image_processor.postprocess(image, output_type="pil")


def _unscaled(config, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latents in the VAE decoder's scale (SDXL-style VAEs may also shift them)."""
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, resolution: int) -> list:
    """PIL images of (B, C, h, w) latents as the pipeline would decode them (tiles, precision)."""
    latents = latents.to(pipe._execution_device)
    with sampling_precision(pipe), vae_tiling(pipe.vae, resolution):
        if decodes_in_fp32(pipe):
            return decode_fp32(pipe, latents)
        image = pipe.vae.decode(_unscaled(pipe.vae.config, latents).to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_device(choice: str = "auto") -> torch.device:
    """`train.device` as a device: auto is CUDA when available, else the CPU."""
    return default_device() if choice == "auto" else torch.device(choice)


def seeded_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, so image i depends only on its seed, not on the batch it is in."""
    # CPU generators: the same seed gives the same starting noise on any device.
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def sampling_precision(pipe):
    """Autocast to the frozen parts' dtype when the UNet is kept in another one.

    During training the UNet stays fp32 (full fine-tune: master weights) or mixed (LoRA: bf16 base,
    fp32 adapters) while the VAE and text encoder are bf16; a diffusers pipeline does not cast between
    them. When all three share a dtype (CPU fp32, or a bf16 pipeline) nothing changes.
    """
    dtypes = {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype}
    if getattr(pipe, "text_encoder_2", None) is not None:
        dtypes.add(pipe.text_encoder_2.dtype)
    if len(dtypes) == 1:
        return contextlib.nullcontext()
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    # Autocast's cast cache would keep a low-precision copy of every trainable weight for the whole
    # call (it caches casts of leaf tensors that require grad): a second UNet. Without it each
    # layer's weight is cast when used and freed after.
    return torch.autocast(pipe._execution_device.type, dtype=low, cache_enabled=False)


TILED_FROM = 768  # px: where VAE tiling starts (the decoder's attention grows with the square of the pixels)
TILE_PX = 512  # px: the largest tile. SDXL's VAE would tile only above its own 1024 px, and its fp32
# decode of one 1024 px image peaks near 4 GB, more than an 8 GB card has beside the bf16 UNet.


@contextlib.contextmanager
def vae_tiling(vae, resolution: int) -> Iterator[None]:
    """Decode in overlapping tiles of at most `TILE_PX` px at `TILED_FROM` px and above (diffusers
    tiles only images larger than the VAE's own sample size). Below that the images stay exactly
    as without tiling."""
    if resolution < TILED_FROM:
        yield
        return
    before = vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.enable_tiling()
    if vae.tile_sample_min_size > TILE_PX:
        scale = vae.tile_sample_min_size // vae.tile_latent_min_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_PX, TILE_PX // scale
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = before


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                  resolution: int, negative_prompt: str = "", batch_size: int = 8,
                  stop: threading.Event | None = None, encode_first: bool | None = None,
                  latents: bool = False) -> list:
    """Render prompts[i] with seeds[i]; batches are cut for memory, not for randomness.

    `latents`: return each image's final latent (C, h, w), fp32 on the CPU, in the UNet's scale
    (what training takes as its target), without decoding it.

    A set `stop` ends sampling after the current denoising step; the interrupted batch is
    dropped (its images are half denoised), so fewer images than prompts come back.
    `encode_first`: encode the prompts where the text encoders are and hand the pipeline their
    embeddings; None (auto) does so when the encoders are not on the pipeline's device, as with
    `train.offload_frozen` on a small card (SDXL's encoders are 1.6 GB in bf16). The images are
    the same to the rounding of another batch size or device.
    """
    device = pipe._execution_device
    extra = {"callback_on_step_end": _interrupt_when(stop)} if stop is not None else {}
    fp32_decode = decodes_in_fp32(pipe) and not latents
    if fp32_decode or latents:
        extra["output_type"] = "latent"
    negatives = [negative_prompt] * len(prompts) if negative_prompt else None
    conditioning = _conditioning(pipe, prompts, negatives, guidance, encode_first)
    images = []
    for start in range(0, len(prompts), batch_size):
        if stop is not None and stop.is_set():
            break
        chunk = slice(start, start + batch_size)
        with sampling_precision(pipe), vae_tiling(pipe.vae, resolution):
            out = pipe(
                **conditioning(chunk),
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
                generator=seeded_generators(seeds[chunk], device),
                **extra,
            )
            if stop is not None and stop.is_set():
                break
            if latents:
                images.extend(out.images.float().cpu())
            else:
                images.extend(decode_fp32(pipe, out.images) if fp32_decode else out.images)
    return images


EMBEDDING_NAMES = {  # what encode_prompt returns, by the names the pipeline's call takes
    False: ("prompt_embeds", "negative_prompt_embeds"),
    True: ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
}


def _device_of(module) -> torch.device | None:
    """Where a module's weights are (None for one without any)."""
    first = next(module.parameters(), None) if hasattr(module, "parameters") else None
    return None if first is None else first.device


def _conditioning(pipe, prompts: list[str], negatives: list[str] | None, guidance: float,
                  encode_first: bool | None):
    """chunk -> the pipeline's conditioning arguments for prompts[chunk]: the prompts themselves,
    or their embeddings, encoded on the text encoders' own device (once per pipeline and prompt)
    and moved to the pipeline's."""
    device = pipe._execution_device
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    if encode_first is None:
        encode_first = any(_device_of(e) not in (None, device) for e in encoders)
    if not encode_first:
        return lambda chunk: dict(prompt=prompts[chunk], negative_prompt=negatives[chunk] if negatives else None)
    where = _device_of(encoders[0]) or device
    memo = vars(pipe).setdefault("_encoded_prompts", {})  # class images: one prompt, many batches
    names = EMBEDDING_NAMES[hasattr(pipe, "text_encoder_2")]
    rows = []
    for i, prompt in enumerate(prompts):
        key = (prompt, negatives[i] if negatives else None, guidance > 1.0)
        if key not in memo:
            with sampling_precision(pipe) if where == device else contextlib.nullcontext():
                out = pipe.encode_prompt(prompt=[key[0]], device=where, num_images_per_prompt=1,
                                         do_classifier_free_guidance=key[2],
                                         negative_prompt=None if key[1] is None else [key[1]])
            memo[key] = [None if t is None else t.to(device) for t in out]
        rows.append(memo[key])
    named = {name: None if rows[0][k] is None else torch.cat([row[k] for row in rows])
             for k, name in enumerate(names)}
    return lambda chunk: {name: None if value is None else value[chunk] for name, value in named.items()}


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put modules in eval mode for sampling and restore each one's mode afterwards."""
    before = [(m, m.training) for m in modules]
    for m, _ in before:
        m.eval()
    try:
        yield
    finally:
        for m, training in before:
            m.train(training)


def sample_per_prompt(pipe, prompts: list[str], seeds: list[int], **options) -> list[list]:
    """Every prompt with every seed: one list of images per prompt, in the order of `seeds`.

    The same (prompt, seed) pair gives the same image in any call, so rows from two models or two
    steps compare image by image. `options` are those of `sample_images`.
    """
    flat = sample_images(pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds], **options)
    n = len(seeds)
    return [flat[i * n:(i + 1) * n] for i in range(len(flat) // n if n else 0)]


def _interrupt_when(stop: threading.Event):
    """A diffusers step callback: the pipeline skips its remaining steps once `stop` is set."""

    def callback(pipe, step, timestep, tensors):
        if stop.is_set():
            pipe._interrupt = True  # diffusers' own flag, reset at the start of every call
        return tensors

    return callback


def use_tool_cache() -> None:
    """Point inductor's on-disk cache at the tool's cache (for code that calls torch.compile itself)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def compiled(module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """`torch.compile(module, mode=mode)`; the module itself is left as it is."""
    use_tool_cache()
    return torch.compile(module, mode=mode)


def make_grid(images: list[Image.Image], cols: int | None = None, *, pad: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images row by row (all resized to the first one's size) with `pad` pixels between."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = image.convert("RGB")
        if tile.size != (w, h):
            tile = tile.resize((w, h), Image.Resampling.LANCZOS)
        sheet.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
