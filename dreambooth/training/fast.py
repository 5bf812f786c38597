"""The fast training step: the same math as `step.PlainStep`, laid out for a GPU.

Cached posteriors sit in device tensors and each step gathers its rows by index; the random draws
come from the same per-step generators, in the same order, as the plain step's, so both paths see
the same batches and resume stays exact; on CUDA forward and backward replay as one CUDA graph.
Key constraint: on a CPU in fp32 with AdamW the result equals the plain step's bit for bit
(tests/test_fast_path.py). Rationale and the known differences: docs/training-step.md.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dreambooth.sampling import compiled
from dreambooth.training.adamw_fp8 import AdamWFp8
from dreambooth.training.batches import latents_cached, pick, step_generator
from dreambooth.training.losses import (
    LossParts,
    add_noise,
    add_offset_noise,
    per_sample_loss,
    prediction_target,
    sample_timesteps,
)
from dreambooth.training.scaling import Scaling
from dreambooth.training.state import TrainState, added_conditions, text_encoders_of
from dreambooth.training.step import loss_weights
from dreambooth.training.weight_copy import AdamWCopies, CopiedModule, copies_in_place, total_grad_norm


def fast_path_problems(config, device: torch.device, num_processes: int, mixed_precision: str) -> list[str]:
    """Why the fast step cannot run this configuration (empty when it can)."""
    train = config.train
    checks = [
        (train.grad_accum == 1, "train.grad_accum > 1"),
        (latents_cached(config), "latents are not cached (random crop or cache_latents off)"),
    ]
    return [why for ok, why in checks if not ok]


def use_fast_path(config, device: torch.device, num_processes: int, mixed_precision: str) -> tuple[bool, str]:
    """(use it, a notice for the user): `auto` means on for CUDA, off elsewhere. With several
    processes the notice says how their gradients meet: after the graph, not inside it."""
    wanted = config.train.fast == "always" or (config.train.fast == "auto" and device.type == "cuda")
    if not wanted:
        return False, ""
    problems = fast_path_problems(config, device, num_processes, mixed_precision)
    if problems:
        return False, "fast training step not used, the plain step runs: " + "; ".join(problems)
    if num_processes > 1:
        graph = " after each CUDA graph replay" if device.type == "cuda" and config.train.cuda_graph else ""
        return True, (f"fast training step on {num_processes} processes: the gradients are averaged{graph} "
                      "(one all-reduce per flat buffer or 32M-value bucket), then clipped")
    return True, ""


def prepare_modules(components, config, device: torch.device) -> None:
    """Layout switches that change speed, not math beyond bf16 rounding; CUDA only."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = config.train.cudnn_benchmark  # its timing runs cost seconds on the first step
    # 8-bit AdamW on CUDA trains flat buffers whose gradient views share their weights' strides
    # (training/flat.py), so channels-last is safe with it too.
    if config.train.channels_last:
        components.unet.to(memory_format=torch.channels_last)
        components.vae.to(memory_format=torch.channels_last)


def lowers_frozen(config, fast: bool, frozen_dtype: torch.dtype) -> bool:
    """Whether the fast step stores a LoRA run's frozen weights in the autocast dtype."""
    return fast and config.train.mode == "lora" and frozen_dtype != torch.float32


def raise_trainable_to_fp32(modules: dict[str, torch.nn.Module]) -> None:
    """Trainable parameters in fp32, whatever the dtype of the frozen layers they were added to."""
    for module in modules.values():
        for param in module.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()


def lower_frozen_weights(modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
    """Store frozen weights (the base of a LoRA model) in the autocast dtype.

    Autocast would cast them on every forward anyway; storing them cast saves that copy and the fp32
    memory. Trainable parameters (the adapters) stay fp32.
    """
    for module in modules.values():
        for param in module.parameters():
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def takes_grad_scale(optimizer) -> bool:
    """Fused AdamW and our AdamWFp8 and AdamWCopies divide each gradient by `optimizer.grad_scale` as
    they read it."""
    fused = isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)
    return fused or isinstance(optimizer, (AdamWFp8, AdamWCopies))


def grad_scale_for_clipping(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The divisor that makes fused AdamW's `grad_scale` do `clip_grad_norm_`'s scaling:
    1 / min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)


def wants_flat(config, device: torch.device) -> bool:
    """Low-bit AdamW on the fast step trains flat buffers (training/flat.py): a few launches per module,
    and for torchao one compiled kernel shape per module instead of one per parameter shape (on any
    device). The plain step updates tensor by tensor (train_events says so for torchao)."""
    optimizer = config.train.optimizer
    low_bit = optimizer.endswith("_torchao") or optimizer == "adamwfp8"
    return low_bit or (device.type == "cuda" and optimizer == "adamw8bit")


class StepDraws(NamedTuple):
    """Everything random about one step, drawn on the host: rows (B,), latent noise and noise
    (B, C, h, w) fp32, timesteps (B,)."""

    rows: torch.Tensor
    latent_noise: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass(frozen=True)
class BatchLayout:
    """The shape of a fast step's batch: images per source (subject, then class), rows taken from
    each per step, one latent's shape (C, h, w), the noise schedule's number of timesteps and the
    offset noise's strength (`train.offset_noise`, 0: none)."""

    sizes: tuple[int, ...]
    batch_size: int
    latent_shape: tuple[int, ...]
    num_train_timesteps: int
    offset_noise: float = 0.0


def draw_step(step: int, seed: int, layout: BatchLayout, flip_prob: float) -> StepDraws:
    """The draws of `build_batch` + `PlainStep.backward` for cached posteriors, in the same order.

    Row r of the stacked posteriors is image i of source s flipped or not: offset(s) + 2 i + flip.
    """
    g = step_generator(seed, step, salt=1)
    rows, latent_noise, offset = [], [], 0
    for salt, n in enumerate(layout.sizes):
        for index in pick(n, layout.batch_size, seed, step, salt):
            flip = bool(torch.rand((), generator=g) < flip_prob)
            rows.append(offset + 2 * index + int(flip))
            latent_noise.append(torch.randn(layout.latent_shape, generator=g))
        offset += 2 * n
    g = step_generator(seed, step, salt=2)
    noise = torch.randn((len(rows), *layout.latent_shape), generator=g)
    timesteps = sample_timesteps(len(rows), layout.num_train_timesteps, g)
    if layout.offset_noise:  # after the other draws, as in the plain step
        noise = add_offset_noise(noise, layout.offset_noise, g)
    return StepDraws(torch.tensor(rows), torch.stack(latent_noise), noise, timesteps)


def split_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float,
               row_weights: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None) -> LossParts:
    """`losses.dreambooth_loss` for a batch whose first `num_instance` rows are subject images.

    Same values bit for bit (the same elements are averaged in the same order); a slice keeps the
    shapes static where a boolean mask would not.
    """
    per_sample = per_sample_loss(pred, target, row_weights, pixel_weights)  # (B,)
    instance = per_sample[:num_instance].mean()
    has_prior = per_sample.shape[0] > num_instance
    prior = per_sample[num_instance:].mean() if has_prior else per_sample.new_zeros(())
    return LossParts(instance + prior_weight * prior, instance.detach(), prior.detach())


class FastStep:
    """The plain step's `backward` and `update` (and both as a call) for grad_accum 1 and cached latents."""

    def __init__(self, state: TrainState):
        config, self.state = state.config, state
        self.config, self.components, self.modules = config, state.components, state.modules
        self.prompts, self.optimizer, self.lr_schedule = state.prompts, state.optimizer, state.lr_schedule
        self.device = state.device
        sources = [state.instances] + ([state.classes] if state.classes is not None else [])
        self.sizes = [len(s.images) for s in sources]
        stacked = [s.posteriors() for s in sources]
        self.means = torch.cat([m for m, _ in stacked])  # (2 N, C, h, w): each image and its mirror
        self.stds = torch.cat([s for _, s in stacked])
        # SDXL micro-conditioning per row of `means`: fixed like them, gathered by the same rows
        self.time_ids = torch.cat([s.time_ids() for s in sources]).to(self.device)  # (2 N, 6)
        self.scale = state.instances.scale
        self.batch = config.train.batch_size  # the global batch's subject rows (as many class rows)
        # Several processes: each draws the global batch and computes its contiguous share of the
        # subject rows and of the class rows (as `batches.build_batch`); the gradients are averaged
        # after the backward, outside the graph, so clipping and the fp16 overflow check see the mean.
        self.ranks = state.ranks
        self.local = self.batch // self.ranks.count
        rows = self.local * len(sources)
        # masked loss: the subject rows' masks gathered by row like the posteriors, the class rows' all 1
        masks = state.instances.mask_rows()
        self.masks = None if masks is None else masks.to(self.device)  # (2 N, 1, h, w)
        self.class_masks = None if masks is None else torch.ones((rows - self.local, *masks.shape[1:]),
                                                                   device=self.device)
        self.context_index = torch.tensor([0] * self.local + [1] * (rows - self.local), device=self.device)
        scheduler = state.components.noise_scheduler
        self.alphas = scheduler.alphas_cumprod.to(self.device)
        self.num_t = scheduler.config.num_train_timesteps
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.mixed_precision)
        self.scaler = state.scaler  # fp16: its scale and overflow flag are device tensors the graph reads
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ranks.broadcast_([p.detach() for p in self.params])  # as DDP does: every process starts alike
        self.keep_grads = bool(state.flats)  # flat buffers (training/flat.py): zeroed in place, never dropped
        # bf16 weight copies (training/weight_copy.py): the forward reads them; a checkpoint loaded
        # since they were made went into the masters
        self.copied = {n: f for n, f in (state.flats or {}).items() if isinstance(f, CopiedModule)} or None
        for copied in (self.copied or {}).values():
            copied.refresh()
        # fold clipping and the loss scale's 1/scale into the optimizer's read of each gradient
        self.fold = takes_grad_scale(self.optimizer) and (bool(config.train.max_grad_norm) or self.scaler is not None)
        self.unet = self._compiled(state.components.unet)
        self.graphed = (self.device.type == "cuda" and config.train.cuda_graph
                        and config.train.compile != "reduce-overhead")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: StepDraws | None = None
        self.parts: LossParts | None = None

    def _compiled(self, unet):
        mode = self.config.train.compile
        if mode == "none" or self.device.type != "cuda":
            return unet
        return compiled(unet, mode=None if mode == "default" else mode)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each weight is used once per forward, and a cache inside a CUDA graph
        # capture would only hold memory.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def draws(self, step: int) -> StepDraws:
        """Step `step`'s draws for this process's rows of the global batch."""
        layout = BatchLayout(tuple(self.sizes), self.batch, tuple(self.means.shape[1:]), self.num_t,
                             self.config.train.offset_noise)
        drawn = draw_step(step, self.state.seed, layout, self.config.data.flip_prob)
        if self.ranks.count == 1:
            return drawn
        mine = torch.arange(self.batch)[self.ranks.rows(self.batch)]
        keep = torch.cat([mine + source * self.batch for source in range(len(self.sizes))])
        return StepDraws(*(t[keep] for t in drawn))

    def compute(self, draws: StepDraws) -> LossParts:
        """Forward, backward, unscaling (fp16) and gradient clipping of eq. 2 of Ruiz et al. on device
        tensors; no host sync. With several processes the last two wait for `_average`."""
        if self.keep_grads:  # autograd adds into the flat gradient buffers
            torch._foreach_zero_(self._grads())
        mean, std = self.means[draws.rows], self.stds[draws.rows]
        latents = (mean + std * draws.latent_noise.to(mean.dtype)) * self.scale  # (B, C, h, w)
        noise = draws.noise.to(latents.dtype)
        noisy = add_noise(latents, noise, draws.timesteps, self.alphas)
        target = prediction_target(latents, noise, draws.timesteps, self.alphas, self.components.prediction_type)
        masks = None  # subject rows come first; their rows index the subject posteriors, offset 0
        if self.masks is not None:
            masks = torch.cat([self.masks[draws.rows[: self.batch]], self.class_masks])  # (B, 1, h, w)
        row_weights, pixel_weights = loss_weights(self.config.train, draws.timesteps, self.alphas,
                                                  self.components.prediction_type, masks)
        copies = copies_in_place(self.modules, self.copied) if self.copied else contextlib.nullcontext()
        with self._autocast(), copies:
            context, pooled = self.prompts.rows(self.context_index, text_encoders_of(self.modules))  # (B, 77, D)
            added = added_conditions(pooled, self.time_ids[draws.rows])
            pred = self.unet(noisy, draws.timesteps, context, added_cond_kwargs=added).sample
            parts = split_loss(pred, target, self.local, self.config.prior.weight, row_weights, pixel_weights)
        (parts.total if self.scaler is None else self.scaler.scale(parts.total)).backward()
        if self.ranks.count == 1:
            self._unscale_and_clip()
        return parts

    def _average(self, parts: LossParts) -> LossParts:
        """Several processes: the mean gradient (each process's rows are an equal share of the global
        batch), then unscaling and clipping on it, as DDP and the plain step do; the global batch's losses."""
        self.ranks.average_(self._grads())
        self._unscale_and_clip()
        return LossParts(*self.ranks.mean(torch.stack([part.detach().float() for part in parts])))

    def _unscale_and_clip(self) -> None:
        """The plain step's unscaling and `clip_grad_norm_` arithmetic. With fused AdamW or AdamWFp8
        both go into the optimizer kernel (its `grad_scale` divides each gradient as it is read),
        which saves a pass over the gradients; overflow is then told from the scaled norm."""
        max_norm, scaler = self.config.train.max_grad_norm, self.scaler
        if not self.fold:
            if scaler is not None:
                scaler.unscale_(self.params)
            if max_norm:
                torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # what the plain step calls
            return
        grads = self._grads()
        total = total_grad_norm(grads) if self.copied else torch.nn.utils.get_total_norm(grads)
        if scaler is None:
            self.optimizer.grad_scale = grad_scale_for_clipping(total, max_norm)
            return
        scaler.note_norm(total)
        scale = scaler.scale_tensor
        clip = grad_scale_for_clipping(total / scale, max_norm) if max_norm else torch.ones_like(scale)
        self.optimizer.grad_scale = clip * scale

    def _grads(self) -> list[torch.Tensor]:
        if self.copied:  # bf16 gradients of the copies, fp32 ones of the rest, in flat buffers
            return [g for copied in self.copied.values() for g in copied.grads]
        return [p.grad for p in self.params if p.grad is not None]

    def backward(self, step: int) -> LossParts:
        """Queue the forward and backward of `step` (its update waits for `update()`)."""
        for module in self.modules.values():
            module.train()
        host = self.draws(step)
        if not self.graphed:
            parts = self.compute(StepDraws(*(t.to(self.device) for t in host)))
        else:
            parts = self._replay(host)
        return parts if self.ranks.count == 1 else self._average(parts)

    def update(self) -> Scaling | None:
        """Apply the gradients of the last `backward`: optimizer (skipped when fp16 gradients
        overflowed) and learning-rate schedule. Returns what the loss scaler did (None without one)."""
        scaling = self.scaler.finish() if self.scaler is not None else None  # the one host read under fp16
        if scaling is None or not scaling.skipped:
            self.optimizer.step()
        self.lr_schedule.step()
        if not self.graphed:  # a graph overwrites its gradients on every replay
            self._drop_grads()
        return scaling

    def __call__(self, step: int) -> LossParts:
        parts = self.backward(step)
        self.update()
        return parts

    def release(self) -> None:
        """Drop the CUDA graph and its static tensors (the graph's memory pool goes with them); a
        later `backward` would capture a new one."""
        self.graph, self.static, self.parts = None, None, None

    def _drop_grads(self) -> None:
        if not self.keep_grads:
            self.optimizer.zero_grad(set_to_none=True)

    def _replay(self, host: StepDraws) -> LossParts:
        if self.graph is None:
            try:
                self._capture(host)
            except RuntimeError as e:  # an op that cannot be captured: same step, eager
                warnings.warn(f"CUDA graph capture failed, running the fast step eagerly: {e}")
                self.graphed, self.graph = False, None
                self._drop_grads()
                torch.cuda.synchronize()
                return self.compute(StepDraws(*(t.to(self.device) for t in host)))
        for static, value in zip(self.static, host):
            static.copy_(value.pin_memory(), non_blocking=True)
        self.graph.replay()
        return self.parts

    def _capture(self, host: StepDraws) -> None:
        """Warm up on a side stream (cuDNN/cuBLAS choices, compilation), then record one step.

        Warm-up runs forward and backward only, never the optimizer, so the weights are untouched.
        """
        self.static = StepDraws(*(t.to(self.device) for t in host))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.compute(self.static)
                self._drop_grads()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's activations sit in the side stream's blocks; the graph gets its own
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.parts = self.compute(self.static)
        torch.cuda.empty_cache()


class LossReadout:
    """Loss tensors to floats, `lag` steps late: with a lag the host never waits for the step it
    has just queued, so the GPU always has the next step in hand. Lag 0 is the plain behaviour."""

    def __init__(self, lag: int = 0):
        self.lag = lag
        self.pending: deque = deque()

    def push(self, done: int, parts: LossParts, lr: float, scaling: Scaling | None = None) -> None:
        """`scaling`: what the fp16 loss scaler did at this step, passed on with its losses."""
        if not self.lag:
            values = (float(parts.total.detach()), float(parts.instance), float(parts.prior))
            self.pending.append((done, values, lr, None, scaling))
            return
        if parts.total.device.type != "cuda":  # nothing runs ahead of the host: keep the tensors
            self.pending.append((done, (parts.total.detach(), parts.instance, parts.prior), lr, None, scaling))
            return
        stacked = torch.stack([parts.total.detach(), parts.instance, parts.prior]).float()
        host = torch.empty(3, pin_memory=True)
        host.copy_(stacked, non_blocking=True)  # queued behind this step, before the next one
        event = torch.cuda.Event()
        event.record()
        self.pending.append((done, host, lr, event, scaling))

    def take(self, flush: bool = False) -> list[tuple[int, tuple[float, float, float], float, Scaling | None]]:
        """Records of finished steps, oldest first: all of them when `flush`, else all but `lag`."""
        out = []
        while self.pending and (flush or len(self.pending) > self.lag):
            done, values, lr, event, scaling = self.pending.popleft()
            if event is not None:
                event.synchronize()
            out.append((done, tuple(float(v) for v in values), lr, scaling))
        return out
