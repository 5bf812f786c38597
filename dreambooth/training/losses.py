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


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, is_prior: torch.Tensor,
                    prior_weight: float) -> LossParts:
    """MSE(instance) + lambda * MSE(class), each a mean over its own rows.

    pred, target: (B, C, H, W); is_prior: (B,) bool. Averaging each half separately keeps lambda
    meaning what the paper says whatever the instance/class ratio in the batch.
    """
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    instance = per_sample[~is_prior].mean() if (~is_prior).any() else per_sample.new_zeros(())
    prior = per_sample[is_prior].mean() if is_prior.any() else per_sample.new_zeros(())
    return LossParts(instance + prior_weight * prior, instance.detach(), prior.detach())


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform t in [0, T), as in DDPM training."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] and shape it (B, 1, 1, 1) to broadcast over `like`."""
    out = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))
