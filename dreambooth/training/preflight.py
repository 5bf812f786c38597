"""Checks of a training start that need the machine or the file system, not only the config, and
run before the run directory is created or any weights load; the config a resumed run continues with."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from dreambooth.config import RunConfig, build_config
from dreambooth.errors import ConfigError, Problem
from dreambooth.models import detect_source
from dreambooth.models.builtin import BUILTIN_NAMES
from dreambooth.models.vae import vae_folder
from dreambooth.sampling import pick_device


def with_local_model_resolved(config: RunConfig) -> RunConfig:
    """Local model and VAE paths made absolute, so the run (and `generate` on it) works from any folder."""
    model = config.model
    resolved = dataclasses.replace(model, name=_absolute(model.name), vae=_absolute(model.vae) if model.vae else "")
    return config if resolved == model else dataclasses.replace(config, model=resolved)


def _absolute(name: str) -> str:
    path = Path(name).expanduser()
    if name in BUILTIN_NAMES or not path.exists() or path.is_absolute() and str(path) == name:
        return name
    return str(path.resolve())


def check_before_loading(config: RunConfig) -> None:
    """Refuse a model that cannot be found and a device or precision this machine lacks, before anything
    is written."""
    if config.model.name not in BUILTIN_NAMES:
        detect_source(config.model.name, revision=config.model.revision)  # raises ModelSourceError
    if config.model.vae:
        vae_folder(config.model.vae)  # raises ModelSourceError
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda needs a CUDA GPU", [Problem(
            "train.device", "cuda: this machine has no CUDA GPU (or torch was built without CUDA); use auto or cpu")])
    if (config.train.mixed_precision == "fp16" and pick_device(config.train.device).type != "cuda"
            and not cpu_fp16_allowed()):
        where = "this machine has no CUDA GPU" if config.train.device != "cpu" else "train.device is cpu"
        raise ConfigError("fp16 mixed precision needs a CUDA GPU", [Problem(
            "train.mixed_precision", f"fp16: {where}; use auto (full precision on the CPU), no, or bf16 "
            f"(to test fp16 numerics on the CPU, slowly, set {CPU_FP16}=1)")])


CPU_FP16 = "DREAMBOOTH_CPU_FP16"


def cpu_fp16_allowed() -> bool:
    """fp16 on the CPU is emulated and slow, useful only to test fp16 training (loss scaling,
    overflow skips) without a GPU; it runs only when this variable is 1."""
    return os.environ.get(CPU_FP16) == "1"


# cuDNN's algorithm choice and the bf16 weight copies (training/weight_copy.py, whose optimizer also
# reads a per-tensor AdamW checkpoint) change how fast the same steps run, not what they compute
SPEED_SWITCHES = ("cudnn_benchmark", "weight_copy")


def resume_config(saved: RunConfig, given: RunConfig) -> RunConfig:
    """On resume the saved config rules; only the step count, output settings and the switches that
    change speed but not the weights (`SPEED_SWITCHES`, the given value wins) may change."""
    a, b = saved.to_dict(), given.to_dict()
    free = ("output", "eval")  # may change on resume: they do not alter the weights
    diffs = [f"{g}.{k}" for g in a for k in a[g] if a[g][k] != b[g][k] and g not in free and k != "steps"
             and not (g == "train" and k in SPEED_SWITCHES)]
    if diffs:
        raise ConfigError("--resume with a changed configuration would not reproduce the run", [
            Problem(d, f"saved {a[d.split('.')[0]][d.split('.')[1]]!r}, given {b[d.split('.')[0]][d.split('.')[1]]!r}; "
                    "drop the change or start a new run") for d in diffs])
    merged = dict(a, output=b["output"], eval=b["eval"])
    merged["train"] = dict(a["train"], steps=b["train"]["steps"], **{k: b["train"][k] for k in SPEED_SWITCHES})
    return build_config(merged)
