"""An exponential moving average of the trained weights (`train.ema_decay`).

After every optimizer step that changed the weights, average = decay * average + (1 - decay) *
weights, starting from the weights training starts with. The average is kept in fp32 on the
training device (whatever dtype the weights train in) and saved in every checkpoint, so a resumed
run continues the same average. Everything downstream of the steps sees the average instead of the
trained weights: validation grids and checkpoint scoring (inside `applied()`, which puts the
trained weights back bit for bit afterwards) and, once training ends, final/ (`copy_to()`).

It covers exactly what a checkpoint's `trainable.safetensors` holds (the UNet, the text encoders
when they train; for LoRA the adapters), under the same keys.
"""
from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    """The average of the trainable parameters of `modules` ({"unet": ..., ...})."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(f"{prefix}.{name}", p) for prefix, module in modules.items()
                 for name, p in module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (after an optimizer step); no host sync."""
        weights = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_mul_(self.average, self.decay)
        torch._foreach_add_(self.average, weights, alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the average into the weights (in place: a CUDA graph keeps their addresses)."""
        for p, average in zip(self.params, self.average):
            p.copy_(average)

    @contextlib.contextmanager
    def applied(self):
        """The average in the weights inside the block; the trained weights exactly back after it.
        They wait on the CPU meanwhile, so the device holds no third copy of them."""
        with torch.no_grad():
            trained = [p.detach().to("cpu", copy=True) for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, trained):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'unet.<param>': fp32 average, ...}: the keys of `checkpoints.trainable_state`."""
        return {name: average.detach().cpu().contiguous() for name, average in zip(self.names, self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a saved average; raises KeyError naming the first key that does not match."""
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if missing or unexpected:
            raise KeyError(f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                           f"{sorted(missing or unexpected)[0]}")
        for name, average in zip(self.names, self.average):
            average.copy_(state[name])
