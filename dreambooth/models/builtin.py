"""Built-in base models that need no download.

`tiny-random` and `tiny-random-v` are Stable Diffusion 1.x / 2.x architectures shrunk to a few
hundred thousand UNet parameters, with the real CLIP tokenizer vocabulary, initialised
deterministically from a seed. They make smoke tests and CI possible on a CPU without any model hub.
`toy` is the pretrained base model of the toy world, shipped in the package.
`tiny-random-xl` is the SDXL architecture (two text encoders, pooled text embedding and
micro-conditioning through `text_time` added embeddings) shrunk the same way.
`random-sd15`, `random-sd21` and `random-sdxl` are the full-size SD 1.5 (512 px), SD 2.1 (768 px,
v-prediction) and SDXL base (1024 px) architectures from the shipped config folders with seeded random weights: their
speed and memory are those of the real models, so tier presets and benchmarks can be measured on
a GPU with no model hub. They are several GB on disk and built in a minute or so on a GPU.

Each built-in is materialised once as an ordinary diffusers folder in the cache, so it is loaded by
exactly the same code path as a user's diffusers folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dreambooth.atomic import replace_folder

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"
TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "toyworld" / "weights"
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "formats" / "single_file_configs"
FULL_SIZE_RANDOM = {"random-sd15": "sd15", "random-sd21": "sd21", "random-sdxl": "sdxl"}  # -> shipped configs
BUILTIN_NAMES = ("tiny-random", "tiny-random-v", "tiny-random-xl", "toy", *FULL_SIZE_RANDOM)
TINY_SEED = 0
_VARIANTS = {"tiny-random": "sd1", "tiny-random-v": "sd2-v", "tiny-random-xl": "sdxl"}


def cache_root() -> Path:
    """Where the tool keeps class images and built models (override with DREAMBOOTH_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dreambooth"
    return Path(os.environ.get("DREAMBOOTH_CACHE", default))


def builtin_path(name: str) -> Path:
    """Return the diffusers folder of a built-in model, building it on first use."""
    if name == "toy":
        return TOY_WEIGHTS
    target = cache_root() / "builtin" / f"{name}-seed{TINY_SEED}-v1"
    if not (target / "model_index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # a process that built it meanwhile made the same folder (same seed): keep theirs
        if name in FULL_SIZE_RANDOM:
            build = (lambda tmp: save_random_pipeline(tmp, SHIPPED_CONFIGS / FULL_SIZE_RANDOM[name], TINY_SEED))
        else:
            build = (lambda tmp: save_tiny_pipeline(tmp, _VARIANTS[name], TINY_SEED))
        replace_folder(target, build, if_exists="keep")
    return target


def tiny_configs(variant: str) -> dict:
    """Configs of the tiny SD architectures: same block layout as SD 1.5 / 2.1 / SDXL, tiny widths."""
    if variant == "sdxl":
        return tiny_xl_configs()
    sd2 = variant == "sd2-v"
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8) if sd2 else 8,  # SD 2.x gives head dims per block
        use_linear_projection=sd2,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def tiny_xl_configs() -> dict:
    """SDXL's layout (three levels, no attention at the first, 1-2 transformer layers, linear
    projections, `text_time` added embeddings) at tiny widths. The UNet's cross-attention width is
    the two encoders' hidden sizes side by side (32 + 32; SDXL: 768 + 1280); its added-embedding
    input is six micro-conditioning numbers of 8 sinusoidal features each plus the second encoder's
    pooled projection (6 * 8 + 32; SDXL: 6 * 256 + 1280 = 2816)."""
    base = tiny_configs("sd1")
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = dict(base["vae"], scaling_factor=0.13025, force_upcast=True)
    text_2 = dict(base["text_encoder"], hidden_act="gelu")
    scheduler = {k: v for k, v in base["scheduler"].items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler["timestep_spacing"] = "leading"  # EulerDiscreteScheduler, as SDXL ships
    return {"unet": unet, "vae": vae, "text_encoder": base["text_encoder"], "text_encoder_2": text_2,
            "scheduler": scheduler}


def save_tiny_pipeline(out: Path, variant: str, seed: int) -> None:
    """Build a tiny SD pipeline with seeded random weights and save it as a diffusers folder."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = tiny_configs(variant)
    unet, vae, text_encoder = _seeded_parts(cfg, seed)
    if variant == "sdxl":
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        return _save_xl(out, unet, vae, text_encoder, text_encoder_2, EulerDiscreteScheduler(**cfg["scheduler"]))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet,
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(Path(out) / "tokenizer")


def _seeded_parts(cfg: dict, seed: int) -> tuple:
    """UNet, VAE and (first) text encoder of a tiny config, each from its own seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(seed + 2)
    return unet, vae, CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))


def _save_xl(out: Path, unet, vae, text_encoder, text_encoder_2, scheduler) -> None:
    """An SDXL diffusers folder. The second tokenizer has the same vocabulary, padded with "!"
    (id 0) as OpenCLIP pads."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(Path(out) / "tokenizer")
    copy_tokenizer_files(Path(out) / "tokenizer_2")


def save_random_pipeline(out: Path, configs: Path, seed: int) -> None:
    """A full-size pipeline with seeded random weights from a config folder (fp32 safetensors).

    Initialised on the GPU when there is one: a billion parameters take minutes on a CPU.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        if (configs / "text_encoder_2").is_dir():
            return _save_random_xl(out, configs, unet, vae, text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        scheduler=DDIMScheduler.from_pretrained(configs / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(Path(out) / "tokenizer")


def _save_random_xl(out: Path, configs: Path, unet, vae, text_encoder) -> None:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device(unet.device):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
    scheduler = EulerDiscreteScheduler.from_pretrained(configs / "scheduler")
    _save_xl(out, unet, vae, text_encoder, text_encoder_2, scheduler)


def copy_tokenizer_files(dest: Path) -> None:
    """Write vocab.json/merges.txt beside tokenizer.json: transformers 5 saves only the latter,
    and other clients (single-file loaders, older transformers, kohya) read the former."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_DIR.iterdir():
        if not (dest / f.name).exists():
            shutil.copy(f, dest / f.name)
