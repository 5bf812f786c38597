"""Build diffusers pipelines from loaded components, with the sampler the user asked for."""
from __future__ import annotations

import torch

SAMPLER_CLASSES = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(name: str, base_config: dict):
    """A sampler configured with the base model's betas and prediction type."""
    import diffusers

    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_CLASSES)}")
    cls_name, extra = SAMPLER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(dict(base_config), **extra)


def make_pipeline(components, sampler: str = "dpmpp", *, device: torch.device | str | None = None):
    """A StableDiffusionPipeline over the given (possibly LoRA-wrapped) components; no copies made."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=make_scheduler(sampler, components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def seeded_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, so image i depends only on its seed, not on the batch it is in."""
    # CPU generators: the same seed gives the same starting noise on any device.
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                  resolution: int, negative_prompt: str = "", batch_size: int = 8) -> list:
    """Render prompts[i] with seeds[i]; batches are cut for memory, not for randomness."""
    device = pipe._execution_device
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        out = pipe(
            prompt=prompts[chunk],
            negative_prompt=[negative_prompt] * len(prompts[chunk]) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=seeded_generators(seeds[chunk], device),
        )
        images.extend(out.images)
    return images
