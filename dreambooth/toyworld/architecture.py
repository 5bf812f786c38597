"""Configurations of the ``toy`` base model: Stable Diffusion's architecture, shrunk for CPU fine-tuning.

Same component types as SD 1.x (AutoencoderKL, CLIPTextModel with the real CLIP vocabulary,
UNet2DConditionModel with cross-attention, a scaled-linear DDPM schedule with epsilon prediction)
so that every code path of the tool runs unchanged on it; only widths and depths are small.
Sizes were chosen by measuring one fp32 DreamBooth step (batch 2) on 2 CPU cores (MODEL_CARD.md).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip-tokenizer"
TEXT_DIM = 128  # hidden size of the text encoder = UNet cross-attention dim


def build_vae() -> AutoencoderKL:
    """Factor-4 autoencoder: 64x64x3 images <-> 4x16x16 latents (three resolution levels)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 96), layers_per_block=1,
    )


def build_unet() -> UNet2DConditionModel:
    """Three-level UNet on 16x16 latents with cross-attention at 16x16 and 8x8."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 192), norm_num_groups=32, cross_attention_dim=TEXT_DIM,
        attention_head_dim=(4, 8, 8),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_text_encoder() -> CLIPTextModel:
    """4-layer CLIP text transformer over the full 49,408-token vocabulary, 77 positions."""
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """Stable Diffusion's schedule: 1000 steps, scaled-linear betas, epsilon target; DDIM for sampling."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def load_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE vocabulary shipped with the package (offline)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
