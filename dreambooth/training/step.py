"""The plain training step: any device, precision, crop and gradient accumulation."""
from __future__ import annotations

import contextlib

import torch

from dreambooth.training.batches import build_batch, step_generator
from dreambooth.training.losses import (
    LossParts,
    add_noise,
    add_offset_noise,
    dreambooth_loss,
    mask_weights,
    min_snr_weights,
    prediction_target,
    sample_timesteps,
)
from dreambooth.training.scaling import Scaling
from dreambooth.training.state import TrainState, added_conditions


class PlainStep:
    """One optimizer step (with gradient accumulation) of eq. 2 of Ruiz et al., in the two halves
    the loop calls: `backward(step)`, then `update()`."""

    def __init__(self, state: TrainState):
        self.state = state

    def backward(self, step: int) -> LossParts:
        return backward(self.state, step)

    def update(self) -> Scaling | None:
        return update(self.state)


def backward(state: TrainState, step: int) -> LossParts:
    """Forward and backward of each micro-batch of `step`, then gradient clipping.

    fp16 runs its own autocast and loss scaler (`state.scaler`; accelerate is told "no"), so the
    plain and the fast step scale, unscale and skip the same way on any device. With several
    processes each runs its rows of the global batch and DDP averages the gradients. The loss
    options (min-SNR, offset noise, masked loss) are off unless set, and then act as in the fast step.
    """
    config, accelerator, optimizer, scaler = state.config, state.accelerator, state.optimizer, state.scaler
    train = config.train
    unet = state.wrapped["unet"]
    for module in state.wrapped.values():
        module.train()
    scheduler = state.components.noise_scheduler
    alphas, num_t = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps
    for micro in range(train.grad_accum):
        k = step * train.grad_accum + micro
        latents, is_prior, time_ids, rows, size, masks = build_batch(
            k, state.seed, state.instances, state.classes, train.batch_size, config.data.flip_prob, state.ranks)
        g = step_generator(state.seed, k, salt=2)
        # drawn for the global batch, this process's rows taken: the draws of one process
        noise = torch.randn((size, *latents.shape[1:]), generator=g)  # (B, 4, H/8, W/8)
        t = sample_timesteps(size, num_t, g)[rows].to(latents.device)
        if train.offset_noise:  # drawn after the other draws: runs without it see the same noise
            noise = add_offset_noise(noise, train.offset_noise, g)
        noise = noise[rows].to(latents)
        noisy = add_noise(latents, noise, t, alphas)
        target = prediction_target(latents, noise, t, alphas, state.components.prediction_type)
        row_weights, pixel_weights = loss_weights(train, t, alphas, state.components.prediction_type, masks)
        sync = micro == train.grad_accum - 1
        autocast = accelerator.autocast() if scaler is None else torch.autocast(latents.device.type, torch.float16)
        with contextlib.nullcontext() if sync else accelerator.no_sync(unet), autocast:
            context, pooled = state.prompts.batch(is_prior, state.text_encoders)  # (B, 77, D), (B, P)
            pred = unet(noisy, t, context, added_cond_kwargs=added_conditions(pooled, time_ids)).sample
            parts = dreambooth_loss(pred, target, is_prior.to(pred.device), config.prior.weight, row_weights,
                                    pixel_weights)
            loss = parts.total / train.grad_accum
            accelerator.backward(loss if scaler is None else scaler.scale(loss))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.unscale_(params)
    if train.max_grad_norm:
        accelerator.clip_grad_norm_(params, train.max_grad_norm)
    # DDP averaged the gradients; the losses reported are the global batch's too (equal row counts)
    if state.ranks.count > 1:
        parts = LossParts(*state.ranks.mean(torch.stack([part.detach().float() for part in parts])))
    return parts


def loss_weights(train, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                 masks: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The loss options' weights of one batch (both steps use it): min-SNR row weights (B,) when
    `train.min_snr_gamma` is set, and the masked loss's pixel weights (B, 1, h, w) from the rows'
    masks (None when off)."""
    rows = None
    if train.min_snr_gamma:
        rows = min_snr_weights(timesteps, alphas_cumprod, train.min_snr_gamma, prediction_type)
    pixels = None if masks is None else mask_weights(masks, train.mask_background_weight)
    return rows, pixels


def update(state: TrainState) -> Scaling | None:
    """Apply the accumulated gradients: optimizer step (skipped when fp16 gradients overflowed),
    learning-rate schedule, gradients dropped. Returns what the loss scaler did (None without one)."""
    scaling = state.scaler.finish() if state.scaler is not None else None
    if scaling is None or not scaling.skipped:
        state.optimizer.step()
    state.lr_schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    return scaling
