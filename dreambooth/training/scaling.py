"""Dynamic loss scaling for fp16 training, shared by the plain and the fast step.

fp16 gradients of a diffusion loss underflow to zero, so the loss is multiplied by a large scale
before backward and the gradients are divided by it before they are used. A step whose gradients
overflowed (inf/NaN) is skipped and the scale halved; after `growth_interval` good steps in a row
it doubles. The state (scale, growth tracker, factors) is torch.amp.GradScaler's, so it saves and
loads as GradScaler's does, but the steps are written as device ops on tensors made before any
CUDA graph capture: the scale and the overflow flag are device tensors updated in place, so a
captured graph that reads them stays right on every replay and nothing in it waits for the host.
The one host read per step, whether it overflowed (`finish`), comes after the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INIT_SCALE = 2.0**16  # GradScaler's default
GROWTH_INTERVAL = 2000
# A step that overflows at a scale below 1 overflows unscaled: no loss scale can fix that, the run
# diverged. From the initial 2^16 that is the 18th skipped step in a row (the scale halves on each).
MIN_LOSS_SCALE = 1.0


@dataclass(frozen=True)
class Scaling:
    """What the loss scaler did at one step: whether the update was skipped, the scale it used."""

    skipped: bool
    loss_scale: float


class LossScaler:
    """GradScaler's dynamic scaling, as device ops a CUDA graph can hold (see the module docstring)."""

    def __init__(self, device: torch.device, init_scale: float | None = None):
        self.scaler = torch.amp.GradScaler(device.type, init_scale=INIT_SCALE if init_scale is None else init_scale,
                                           growth_interval=GROWTH_INTERVAL)
        self.scaler._lazy_init_scale_growth_tracker(device)  # the device tensors exist from here on
        self.found_inf = torch.zeros((), device=device)  # 1.0 when the last gradients were not finite

    @property
    def scale_tensor(self) -> torch.Tensor:
        return self.scaler._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler._scale

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients by the scale in place and note whether any is not finite."""
        self.found_inf.zero_()
        inverse = self.scaler._scale.double().reciprocal().float()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inverse)

    def note_norm(self, scaled_norm: torch.Tensor) -> None:
        """Overflow told from the norm of the still-scaled gradients (an inf or NaN in any makes it
        non-finite), for optimizers that divide by the scale themselves (`grad_scale`)."""
        self.found_inf.copy_(~torch.isfinite(scaled_norm))

    def finish(self) -> Scaling:
        """Read whether this step overflowed and the scale it used (one host sync), then update the
        scale in place: halved after an overflow, doubled after `growth_interval` good steps."""
        found, scale = torch.stack([self.found_inf, self.scaler._scale.float()]).tolist()
        s = self.scaler
        torch._amp_update_scale_(s._scale, s._growth_tracker, self.found_inf, s._growth_factor, s._backoff_factor,
                                 s._growth_interval)
        return Scaling(bool(found), scale)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)  # fills the existing tensors: a captured graph keeps reading them


def divergence(loss: float, scaling: Scaling | None) -> str | None:
    """Why a reported step means the run diverged, or None.

    Without loss scaling a non-finite loss is divergence. Under fp16 a non-finite loss on a skipped
    step is an overflow that left the weights untouched; the run has diverged only when steps keep
    overflowing at a loss scale below `MIN_LOSS_SCALE`, or a step that was applied had a
    non-finite loss. NaN weights are caught where checkpoints are written.
    """
    if scaling is None or not scaling.skipped:
        return None if math.isfinite(loss) else f"the loss became {loss}"
    if scaling.loss_scale < MIN_LOSS_SCALE:
        return (f"fp16 gradients kept overflowing (loss {loss}) down to loss scale {scaling.loss_scale:g}, "
                "where no scaling explains them")
    return None
