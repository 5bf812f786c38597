"""Checks of a training start that need the machine or the file system, not only the config, and
run before the run directory is created or any weights load."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dreambooth.config import RunConfig
from dreambooth.errors import ConfigError, Problem


def with_local_model_resolved(config: RunConfig) -> RunConfig:
    """A local model path made absolute, so the run (and `generate` on it) works from any folder."""
    from dreambooth.models.builtin import BUILTIN_NAMES

    name = config.model.name
    path = Path(name).expanduser()
    if name in BUILTIN_NAMES or not path.exists() or path.is_absolute() and str(path) == name:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, name=str(path.resolve())))


def check_before_loading(config: RunConfig) -> None:
    """Refuse a model that cannot be found and a precision this machine lacks, before anything is written."""
    import torch

    from dreambooth.models import detect_source
    from dreambooth.models.builtin import BUILTIN_NAMES

    if config.model.name not in BUILTIN_NAMES:
        detect_source(config.model.name, revision=config.model.revision)  # raises ModelSourceError
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("fp16 mixed precision needs a CUDA GPU", [Problem(
            "train.mixed_precision", "fp16: this machine has no CUDA GPU; use auto (full precision on the CPU), "
            "no, or bf16")])
