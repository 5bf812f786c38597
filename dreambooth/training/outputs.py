"""What training writes besides checkpoints: class images, validation grids, the final model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth.atomic import replace_folder, write_json
from dreambooth.config import RunConfig
from dreambooth.models import model_identity
from dreambooth.models.builtin import copy_tokenizer_files
from dreambooth.priors import class_image_key, class_image_progress
from dreambooth.prompts import fill_prompt
from dreambooth.ranks import Ranks
from dreambooth.rundir import RUN_INFO, RunDir
from dreambooth.sampling import eval_mode, make_grid, make_pipeline, pipeline_of, sample_per_prompt
from dreambooth.training.state import TEXT_ENCODER_NAMES


def prepare_class_images(components, config: RunConfig, device, stop=None, ranks: Ranks = Ranks(),
                         dtype: torch.dtype = torch.float32):
    """Yield (done, total, paths) as class images are made; paths is final when done == total.

    A set `stop` ends the iteration early, with the finished images kept in the cache. The models
    are where training placed them (text encoders kept on the CPU stay there: no `pipe.to`). Several
    processes each make their share (`priors.class_image_progress`). `dtype` is the frozen models'
    (`prior.fast` samples with the UNet in it).
    """
    cuda = torch.device(device).type == "cuda"
    yield from class_image_progress(
        class_image_key(components.folder, config), config.prior.num_images,
        lambda: make_pipeline(components, config.prior.sampler, compile_unet=config.prior.compile and cuda,
                              graphed=dtype if config.prior.fast and cuda else None),
        cache_dir=config.prior.cache or None, batch_size=config.prior.batch_size, stop=stop, ranks=ranks,
    )


@torch.no_grad()
def write_samples(components, config: RunConfig, run: RunDir, step: int) -> Path:
    """A validation grid: one row per prompt, fixed seeds, so grids of different steps compare."""
    out = config.output
    prompts = [fill_prompt(p, config.data.identifier, config.data.class_noun) for p in out.sample_prompts]
    pipe = make_pipeline(components, "dpmpp")
    with eval_mode(components.unet, *components.text_encoders):
        # batches as large as the preset's class-image batches, which it sizes for the card
        rows = sample_per_prompt(pipe, prompts, list(range(out.sample_images)), steps=out.sample_steps,
                                 guidance=7.5, resolution=config.data.resolution,
                                 batch_size=config.prior.batch_size)
    images = [image for row in rows for image in row]
    path = run.samples / f"step-{step:05d}.png"
    make_grid(images, cols=out.sample_images).save(path)
    return path


def run_info(components, config: RunConfig) -> dict:
    return {
        "format": "dreambooth-run/1",
        "mode": config.train.mode,
        "identifier": config.data.identifier,
        "class_noun": config.data.class_noun,
        "instance_prompt": fill_prompt(config.data.instance_prompt, config.data.identifier, config.data.class_noun),
        "base_model": config.model.name,
        "base_model_identity": model_identity(components.folder),
        "prediction_type": components.prediction_type,
        "resolution": config.data.resolution,
        "steps": config.train.steps,
        "train_text_encoder": config.train.train_text_encoder,
        **({"vae": config.model.vae} if config.model.vae else {}),  # a LoRA's base is used with it
        **({"ema_decay": config.train.ema_decay} if config.train.ema_decay else {}),  # final/ holds the average
    }


def save_final(components, config: RunConfig, run: RunDir, selection: tuple[int, str] | None = None) -> Path:
    """Write final/ atomically: a diffusers folder (full) or LoRA weights + base reference (lora)."""
    def write(tmp: Path) -> None:
        if config.train.mode == "full":
            save_pipeline_folder(components, tmp)
        else:
            save_lora_weights(components, config, tmp)
        info = run_info(components, config)
        if selection is not None:
            info["selected_step"], info["selection_reason"] = selection
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))

    return replace_folder(run.final, write)


def add_memory_summary(final: Path, peaks) -> None:
    """Add each phase's peak memory (`memory.PhasePeak`s) to final/'s run summary, once every phase
    has run (the final save comes before the last samples)."""
    path = final / RUN_INFO
    info = json.loads(path.read_text())
    info["memory"] = {p.phase: {k: v for k, v in p.record().items() if k != "phase"} for p in peaks}
    write_json(path, info, indent=2)


def save_pipeline_folder(components, folder: Path) -> None:
    """A complete diffusers pipeline (safetensors) with the base model's own scheduler config
    (SDXL: a StableDiffusionXLPipeline folder with tokenizer_2/ and text_encoder_2/)."""
    import diffusers

    base = diffusers.DDPMScheduler.load_config(components.folder, subfolder="scheduler")
    scheduler = getattr(diffusers, base["_class_name"]).from_config(base)
    scheduler.register_to_config(prediction_type=components.prediction_type)
    pipe = pipeline_of(components, scheduler)
    # fp32 throughout: frozen parts that trained in bf16/fp16 beside fp32 weights would give a folder
    # that a plain `from_pretrained(folder)` loads with mixed dtypes and fails at the first matmul.
    parts = (components.unet, components.vae, *components.text_encoders)
    dtypes = [part.dtype for part in parts]
    for part in parts:
        part.to(torch.float32)
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
        # in place of transformers 5's layout; the second encoder (with projection) keeps `text_model.` itself
        write_text_encoder(components.text_encoder, folder / "text_encoder")
    finally:
        for part, dtype in zip(parts, dtypes):
            part.to(dtype)
    for name in ("tokenizer", "tokenizer_2")[: len(components.tokenizers)]:
        copy_tokenizer_files(folder / name)


def write_text_encoder(text_encoder, folder: Path, *, dtype: torch.dtype | None = None,
                       variant: str | None = None) -> Path:
    """The text encoder's weights under `text_model.`, the layout transformers 4 saves and reads and
    ComfyUI's diffusers loader detects (transformers 5 reads it too, though it saves without it)."""
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    for old in folder.glob(name.replace(".safetensors", "*.safetensors*")):  # also a sharded index
        old.unlink()
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v.to(dtype or v.dtype).contiguous()
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    save_file(state, str(folder / name), metadata={"format": "pt"})
    return folder / name


def save_lora_weights(components, config: RunConfig, folder: Path) -> None:
    """LoRA layers in the diffusers/PEFT layout that `pipe.load_lora_weights` reads (SDXL: the
    unet., text_encoder. and text_encoder_2. prefixes that StableDiffusionXLPipeline writes).

    The adapter configs go into the file's metadata: without them a loader assumes alpha == rank
    and applies the wrong scale whenever lora_alpha != lora_rank.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers_and_metadata(module):
        return (convert_state_dict_to_diffusers(get_peft_model_state_dict(module)),
                module.peft_config["default"].to_dict())

    unet_layers, unet_meta = layers_and_metadata(components.unet)
    parts = dict(unet_lora_layers=unet_layers, unet_lora_adapter_metadata=unet_meta)
    for name, text_encoder in zip(TEXT_ENCODER_NAMES, components.text_encoders):
        layers, meta = layers_and_metadata(text_encoder) if config.train.train_text_encoder else (None, None)
        parts.update({f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": meta})
    saver = StableDiffusionXLPipeline if components.is_xl else StableDiffusionPipeline
    saver.save_lora_weights(folder, safe_serialization=True, **parts)
