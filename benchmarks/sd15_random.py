"""A Stable Diffusion 1.5 pipeline with random weights, built from configs (no model hub).

The architecture is the published SD 1.5 one (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M,
PNDM sampler); speed and memory depend on the architecture, not on the weights. The tokenizer is the
real CLIP vocabulary shipped in dreambooth/assets. `tiny=True` shrinks every width for CPU dry runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.models.builtin import TOKENIZER_DIR, copy_tokenizer_files, tiny_configs

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SD15_SCHEDULER = dict(  # the PNDM config SD 1.5 ships with
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
)


def configs(tiny: bool) -> dict:
    if not tiny:
        return {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT}
    small = tiny_configs("sd1")
    return {"unet": small["unet"], "vae": small["vae"], "text_encoder": small["text_encoder"]}


def build_pipeline_folder(out: Path, tiny: bool = False, seed: int = 0) -> Path:
    """Write a diffusers folder (fp32 safetensors, as the reference script requires) and return it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (out / "model_index.json").exists():
        return out
    cfg = configs(tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1 B parameters is slow on a CPU
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(out / "tokenizer")
    return out


def write_subject_photos(folder: Path, count: int = 5, size: int = 512) -> Path:
    """Toy-world photos of one dog, upscaled to the training resolution."""
    from dreambooth.toyworld import render_subject

    folder.mkdir(parents=True, exist_ok=True)
    for i, context in enumerate(["plain", "table", "city", "plain", "table"][:count]):
        render_subject("dog", context, seed=i).resize((size, size)).save(folder / f"dog{i}.png")
    return folder
