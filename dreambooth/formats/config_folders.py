"""Diffusers config folders (configs and tokenizer, no weights): what converting a single file
needs, since a bare state dict does not say which architecture it is.

A folder comes from an explicit `config=` diffusers folder, a `<file stem>.config/` folder next
to the file, the configs our exports store in their metadata (`CONFIGS_METADATA_KEY`), or one of
the shipped SD 1.5 / SD 2.1 / SDXL folders in `single_file_configs/`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dreambooth.models.builtin import SHIPPED_CONFIGS, TOKENIZER_DIR, copy_tokenizer_files

CONFIGS_METADATA_KEY = "dreambooth.diffusers_configs"


def write_configs(dest: Path, configs: dict) -> None:
    """A diffusers config folder (no weights) from {unet, vae, text_encoder, scheduler, tokenizer} dicts;
    SDXL's also hold text_encoder_2 and tokenizer_2."""
    xl = "text_encoder_2" in configs
    default_tokenizer = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    files = {"unet/config.json": configs["unet"], "vae/config.json": configs["vae"],
             "text_encoder/config.json": configs["text_encoder"],
             "scheduler/scheduler_config.json": configs["scheduler"],
             "tokenizer/tokenizer_config.json": configs.get("tokenizer") or default_tokenizer,
             "model_index.json": _model_index(configs["scheduler"]["_class_name"], xl)}
    if xl:
        files["text_encoder_2/config.json"] = configs["text_encoder_2"]
        files["tokenizer_2/tokenizer_config.json"] = configs.get("tokenizer_2") or default_tokenizer
    for rel, obj in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(obj, indent=2))
    for tokenizer in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        copy_tokenizer_files(dest / tokenizer)


def _model_index(scheduler_class: str, xl: bool = False) -> dict:
    parts = {"scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        return {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True, **parts,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    return {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
            "safety_checker": [None, None], "requires_safety_checker": False, **parts}


def copy_config_folder(src: Path, dest: Path) -> None:
    """Configs and tokenizer of a diffusers folder (weights skipped), plus the CLIP vocabulary."""
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt"):
            (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.relative_to(src))
    copy_tokenizer_files(dest / "tokenizer")
    if (src / "tokenizer_2").is_dir():  # SDXL
        copy_tokenizer_files(dest / "tokenizer_2")


def shipped_configs(name: str) -> dict[str, dict]:
    """{unet, vae, text_encoder[, text_encoder_2]} configs of one shipped folder."""
    parts = [d for d in ("unet", "vae", "text_encoder", "text_encoder_2") if (SHIPPED_CONFIGS / name / d).is_dir()]
    return {d: json.loads((SHIPPED_CONFIGS / name / d / "config.json").read_text()) for d in parts}


def set_prediction_type(dest: Path, prediction: str) -> None:
    path = dest / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), prediction_type=prediction), indent=2))


def sidecar_config(path: Path) -> Path | None:
    """The `<file stem>.config/` diffusers folder next to a checkpoint file, if there is one."""
    side = path.with_suffix(".config")
    return side if (side / "unet" / "config.json").exists() else None


def folder_configs_digest(folder: Path) -> str:
    files = sorted(f for f in folder.rglob("*.json") if f.is_file())
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
