"""The DreamBooth objective as pure functions on tensors.

Ruiz et al. 2023, eq. 2: the usual denoising loss on the subject images plus lambda times the same
loss on class images that the frozen model generated (prior preservation). Both halves share one
batch: rows flagged `is_prior` are class images.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.  Shapes (B, C, H, W)."""
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def prediction_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    (v-prediction, Salimans & Ho 2022, used by SD 2.x 768 px models)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon or v_prediction")


class LossParts(NamedTuple):
    total: torch.Tensor  # what backward() sees
    instance: torch.Tensor  # MSE on the subject rows
    prior: torch.Tensor  # MSE on the class rows (0 when there are none)


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, is_prior: torch.Tensor, prior_weight: float,
                    row_weights: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None) -> LossParts:
    """MSE(instance) + lambda * MSE(class), each a mean over its own rows.

    pred, target: (B, C, H, W); is_prior: (B,) bool. Averaging each half separately keeps lambda
    meaning what the paper says whatever the instance/class ratio in the batch. `row_weights` (B,)
    and `pixel_weights` (B, 1, H, W): see `per_sample_loss`.
    """
    per_sample = per_sample_loss(pred, target, row_weights, pixel_weights)  # (B,)
    instance = per_sample[~is_prior].mean() if (~is_prior).any() else per_sample.new_zeros(())
    prior = per_sample[is_prior].mean() if is_prior.any() else per_sample.new_zeros(())
    return LossParts(instance + prior_weight * prior, instance.detach(), prior.detach())


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor | None = None,
                    pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's squared error (B,), fp32: the plain mean over (C, H, W), or with `pixel_weights`
    (B, 1, H, W) the weighted mean (divided by the row's mean weight, so the loss keeps its scale),
    times `row_weights` (B,) when given (min-SNR). Both steps call this, so they weigh alike."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, H, W)
    if pixel_weights is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        # an empty mask under background weight 0 (a crop that missed the subject) weighs nothing
        mean_weight = pixel_weights.mean(dim=(1, 2, 3)).clamp(min=1e-6)
        per_sample = (error * pixel_weights).mean(dim=(1, 2, 3)) / mean_weight
    return per_sample if row_weights is None else per_sample * row_weights


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), (B,) fp32 on the timesteps' device.

    SNR(t) = a_t / (1 - a_t). Epsilon prediction: min(SNR, gamma) / SNR; v-prediction, whose loss is
    (SNR + 1) times the x0 loss where epsilon's is SNR times: min(SNR, gamma) / (SNR + 1).
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def add_offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): `noise` (B, C, H, W) plus `strength` times one normal draw per
    row and channel, so the model also learns to shift an image's mean brightness. The draw comes
    from `generator`, after the step's other draws."""
    offset = torch.randn((*noise.shape[:2], 1, 1), generator=generator)  # (B, C, 1, 1)
    return noise + strength * offset.to(noise)


def mask_weights(masks: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Pixel weights of the masked loss from masks in [0, 1] (1 = subject): 1 on the subject,
    `background_weight` elsewhere, linear in between (a latent cell partly covered)."""
    return background_weight + (1 - background_weight) * masks


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform t in [0, T), as in DDPM training."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] and shape it (B, 1, 1, 1) to broadcast over `like`."""
    out = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))
