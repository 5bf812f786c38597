"""Self-describing exports: the run's facts and a `modelspec.*` block in every exported file.

The modelspec keys follow Stability AI's model metadata spec (sai_model_spec 1.0.0), which A1111,
ComfyUI and kohya sd-scripts read; the `dreambooth.*` keys carry what this tool needs to reload
and reproduce (identifier, class noun, base model, the resolved training config).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from .export_layout import text_family

STABILITY_IMPL = "https://github.com/Stability-AI/generative-models"


def architecture(text_encoder_config: dict, prediction_type: str, lora: bool) -> str:
    """modelspec.architecture: SD 1.x, SD 2.x 512 (epsilon) or SD 2.x 768-v, '/lora' for adapters."""
    if text_family(text_encoder_config) == "sd1":
        arch = "stable-diffusion-v1"
    else:
        arch = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return arch + ("/lora" if lora else "")


def export_metadata(info: dict, config: dict, text_encoder_config: dict, *, lora: bool,
                    implementation: str) -> dict[str, str]:
    """String-to-string metadata (safetensors allows nothing else) describing one export."""
    res = int(info["resolution"])
    prediction = info["prediction_type"]
    trigger = f"{info['identifier']} {info['class_noun']}"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(text_encoder_config, prediction, lora),
        "modelspec.implementation": implementation,
        "modelspec.title": f"{trigger} (DreamBooth, {info['base_model']})",
        "modelspec.description": f"DreamBooth fine-tune of {info['base_model']} on one {info['class_noun']} "
                                 f"subject; prompt with '{info['instance_prompt']}'",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": trigger,
        "modelspec.usage_hint": f"use '{trigger}' in the prompt for the subject",
        "dreambooth.identifier": info["identifier"],
        "dreambooth.class_noun": info["class_noun"],
        "dreambooth.instance_prompt": info["instance_prompt"],
        "dreambooth.base_model": str(info["base_model"]),
        "dreambooth.base_model_identity": str(info.get("base_model_identity", "")),
        "dreambooth.mode": info["mode"],
        "dreambooth.steps": str(info["steps"]),
        "dreambooth.training_config": json.dumps(config, sort_keys=True),
    }
