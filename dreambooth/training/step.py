"""The plain training step: any device, precision, crop and gradient accumulation."""
from __future__ import annotations

import contextlib

import torch

from dreambooth.training.batches import build_batch, step_generator
from dreambooth.training.losses import LossParts, add_noise, dreambooth_loss, prediction_target, sample_timesteps
from dreambooth.training.state import TrainState


class PlainStep:
    """One optimizer step (with gradient accumulation) of eq. 2 of Ruiz et al., in the two halves
    the loop calls: `backward(step)`, then `update()`."""

    def __init__(self, state: TrainState):
        self.state = state

    def backward(self, step: int) -> LossParts:
        return backward(self.state, step)

    def update(self) -> None:
        update(self.state)


def backward(state: TrainState, step: int) -> LossParts:
    """Forward and backward of each micro-batch of `step`, then gradient clipping."""
    config, accelerator, optimizer = state.config, state.accelerator, state.optimizer
    train = config.train
    unet = state.wrapped["unet"]
    for module in state.wrapped.values():
        module.train()
    scheduler = state.components.noise_scheduler
    alphas, num_t = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps
    for micro in range(train.grad_accum):
        k = step * train.grad_accum + micro
        latents, is_prior = build_batch(k, state.seed, state.instances, state.classes, train.batch_size,
                                        config.data.flip_prob)
        g = step_generator(state.seed, k, salt=2)
        noise = torch.randn(latents.shape, generator=g).to(latents)  # (B, 4, H/8, W/8)
        t = sample_timesteps(latents.shape[0], num_t, g).to(latents.device)
        noisy = add_noise(latents, noise, t, alphas)
        target = prediction_target(latents, noise, t, alphas, state.components.prediction_type)
        sync = micro == train.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
            context = state.prompts.batch(is_prior, state.wrapped.get("text_encoder"))  # (B, 77, D)
            pred = unet(noisy, t, context).sample
            parts = dreambooth_loss(pred, target, is_prior.to(pred.device), config.prior.weight)
            accelerator.backward(parts.total / train.grad_accum)
    if train.max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(params, train.max_grad_norm)
    return parts


def update(state: TrainState) -> None:
    """Apply the accumulated gradients: optimizer step, learning-rate schedule, gradients dropped."""
    state.optimizer.step()
    state.lr_schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
