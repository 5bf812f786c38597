"""Typed progress events: the training loop yields them, the CLI and the web app render them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class ClassImagesProgress:
    done: int
    total: int


@dataclass(frozen=True)
class Phase:
    """Slow work outside the steps begins ("class images", "caching latents", "validation images"),
    so a progress display can say what runs instead of showing a frozen step counter."""

    name: str
    total: int = 0  # images the phase makes or encodes, when known


@dataclass(frozen=True)
class Started:
    start_step: int  # > 0 when resumed
    total_steps: int
    trainable_params: int
    device: str
    mixed_precision: str


@dataclass(frozen=True)
class StepDone:
    step: int  # steps completed so far
    total_steps: int
    loss: float
    instance_loss: float
    prior_loss: float
    lr: float
    seconds_per_step: float

    @property
    def eta_seconds(self) -> float:
        return (self.total_steps - self.step) * self.seconds_per_step


@dataclass(frozen=True)
class SampleWritten:
    step: int
    path: Path


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path


@dataclass(frozen=True)
class Evaluated:
    step: int
    scores: dict  # fidelity, prompt_fidelity, drift and the scorer's metrics


@dataclass(frozen=True)
class Selected:
    step: int  # the step whose weights final/ holds
    reason: str


@dataclass(frozen=True)
class Stopped:
    """The stop flag or a signal ended the run early; the checkpoint lets `--resume` continue."""

    step: int
    checkpoint: Path


@dataclass(frozen=True)
class Finished:
    step: int
    final: Path
    seconds: float
    memory: tuple = ()  # memory.PhasePeak per phase, in the order the phases first ran


Event = (Notice | ClassImagesProgress | Phase | Started | StepDone | SampleWritten | CheckpointSaved | Evaluated
         | Selected | Stopped | Finished)
