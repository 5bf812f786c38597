"""A VAE given in place of the base model's own (`model.vae`), e.g. an fp16-fix SDXL VAE.

SDXL's original VAE overflows fp16, so it is kept in fp32 (training.prepare.vae_dtype); a VAE
retrained not to (madebyollin/sdxl-vae-fp16-fix, whose config says force_upcast false) runs in
fp16 at half the memory. It must make the latents the base UNet was trained on: the same latent
channels and downsampling factor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth.errors import ModelSourceError, Problem
from dreambooth.models.source import _HUB_ID, ModelSource, resolve_hub


def vae_folder(spec: str) -> Path:
    """The folder holding the AutoencoderKL's config.json: a VAE folder, a model folder's vae/,
    or a hub id (downloaded, or found in the cache when offline). Raises `ModelSourceError`."""
    path = Path(spec).expanduser()
    if not path.exists() and _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        path = resolve_hub(ModelSource(spec, "hub", None))
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (nor vae/config.json)"
        raise ModelSourceError(f"cannot use model.vae {spec!r}", [Problem(
            "model.vae", f"{spec}: {what}; give a diffusers AutoencoderKL folder or a hub id such as "
            "madebyollin/sdxl-vae-fp16-fix")])
    config = _read_config(path, spec)
    if config.get("_class_name") != "AutoencoderKL":
        raise ModelSourceError(f"cannot use model.vae {spec!r}", [Problem(
            "model.vae", f"{path / 'config.json'}: a {config.get('_class_name')!r}, not an AutoencoderKL")])
    return path


def _read_config(path: Path, spec: str) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"cannot use model.vae {spec!r}", [Problem(
            str(path / "config.json"), f"unreadable: {e}")]) from e


def vae_problems(vae_config: dict, base_config) -> list[Problem]:
    """What makes a VAE unusable with the base model's UNet (the base VAE's config beside it)."""
    problems = []
    for key in ("latent_channels",):
        if vae_config.get(key) != getattr(base_config, key):
            problems.append(Problem("model.vae", f"{key} {vae_config.get(key)} but the model's VAE has "
                                    f"{getattr(base_config, key)}: it is a VAE of another architecture"))
    ours, theirs = len(vae_config.get("block_out_channels", ())), len(base_config.block_out_channels)
    if ours != theirs:
        problems.append(Problem("model.vae", f"downsamples {2 ** (ours - 1)}x but the model's VAE "
                                f"{2 ** (theirs - 1)}x: it is a VAE of another architecture"))
    return problems


def load_vae(spec: str, base_vae, dtype: torch.dtype = torch.float32):
    """The AutoencoderKL named by `spec`, checked against `base_vae` (the one it replaces)."""
    from diffusers import AutoencoderKL

    folder = vae_folder(spec)
    problems = vae_problems(_read_config(folder, spec), base_vae.config)
    if problems:
        raise ModelSourceError(f"model.vae {spec!r} does not fit the model", problems)
    try:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelSourceError(f"cannot load model.vae {spec!r}", [Problem(
            str(folder), f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")]) from e
