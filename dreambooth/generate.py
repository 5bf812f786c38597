"""Render the subject in new contexts, from a run directory or any MODEL (+ optional LoRA).

A run directory describes itself (final/dreambooth.json): full fine-tunes load final/ as a diffusers
folder, LoRA runs load their base model and apply final/'s LoRA weights. `{identifier}` and `{class}`
in prompts are filled from the run.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreambooth.atomic import write_json
from dreambooth.errors import ConfigError, Problem
from dreambooth.formats.lora import load_lora_into_pipeline
from dreambooth.models import load_components
from dreambooth.models.vae import load_vae
from dreambooth.prompts import fill_from_run_info, read_prompt_lines
from dreambooth.rundir import RunDir, is_run_dir
from dreambooth.sampling import DEFAULT_SAMPLER, default_device, make_grid, make_pipeline, sample_per_prompt

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    resolution: int | None = None  # default: the run's or the model's native size
    lora_scale: float = 1.0


@dataclass(frozen=True)
class Loaded:
    components: object
    info: dict | None  # the run's dreambooth.json, when MODEL is a run directory
    lora: Path | None


def load_for_generation(model: str | Path, lora: str | Path | None = None, *, device=None) -> Loaded:
    """Components ready to sample, with the run's LoRA or the given LoRA file applied."""
    device = device or default_device()
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    info = None
    if is_run_dir(model):
        info = RunDir(Path(model)).run_info()
        final = RunDir(Path(model)).final
        if info["mode"] == "full":
            components = load_components(str(final), dtype=dtype)
        else:
            components = load_components(info["base_model"], dtype=dtype)
            if info.get("vae"):  # trained with a VAE in place of the base model's
                components.vae = load_vae(info["vae"], components.vae, dtype)
            lora = lora or final / LORA_FILE
    else:
        components = load_components(str(model), dtype=dtype)
    return Loaded(components.to(device), info, Path(lora) if lora else None)


def make_generation_pipeline(loaded: Loaded, settings: GenerationSettings):
    pipe = make_pipeline(loaded.components, settings.sampler)
    if loaded.lora is not None:
        load_lora_into_pipeline(pipe, loaded.lora, scale=settings.lora_scale)
    return pipe


def generate(model: str | Path, prompts: list[str], output: str | Path, *, num: int = 4, seed: int = 0,
             settings: GenerationSettings = GenerationSettings(), lora: str | Path | None = None,
             loaded: Loaded | None = None) -> list[Path]:
    """Write num images per prompt (seeds seed..seed+num-1 for every prompt), their settings JSON
    and a grid (one row per prompt). Existing files in `output` are never overwritten."""
    if not prompts:
        raise ConfigError("no prompt given", [Problem("--prompt", "give at least one prompt or a prompt file")])
    loaded = loaded or load_for_generation(model, lora)
    filled = [fill_from_run_info(p, loaded.info) for p in prompts]
    resolution = settings.resolution or (loaded.info or {}).get("resolution") or loaded.components.resolution
    pipe = make_generation_pipeline(loaded, settings)
    seeds = [seed + j for j in range(num)]
    rows = sample_per_prompt(pipe, filled, seeds, steps=settings.steps, guidance=settings.guidance,
                             resolution=resolution, negative_prompt=settings.negative_prompt)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    first = _next_index(out)
    images = [image for row in rows for image in row]
    paths = []
    for k, image in enumerate(images):
        prompt, s = filled[k // num], seeds[k % num]
        path = out / f"{first + k:04d}-{_slug(prompt)}-seed{s}.png"
        image.save(path)
        record = dict(asdict(settings), prompt=prompt, seed=s, resolution=resolution, model=str(model),
                      lora=str(loaded.lora) if loaded.lora else None)
        write_json(path.with_suffix(".json"), record, indent=2)
        paths.append(path)
    make_grid(images, cols=num).save(out / f"grid-{first:04d}.png")
    return paths


def _next_index(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d{4,})-", p.name))]
    return max(numbers) + 1 if numbers else 0


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def read_prompts(prompts: list[str], prompt_file: str | Path | None) -> list[str]:
    """--prompt values, then the file's prompts; placeholders stay for `fill_from_run_info`."""
    return list(prompts) + ([text for _, text in read_prompt_lines(prompt_file)] if prompt_file else [])
