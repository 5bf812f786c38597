"""Self-describing exports: the run's facts and a `modelspec.*` block in every exported file.

The modelspec keys follow Stability AI's model metadata spec (sai_model_spec 1.0.0). kohya
sd-scripts writes them and SwarmUI reads them; A1111, Forge and ComfyUI do not use them to decide
anything. What those read is elsewhere: A1111 and Forge list a LoRA by the kohya `ss_*` keys
(`ss_v2`, `ss_base_model_version`, `ss_tag_frequency`, `ss_output_name`; see `kohya_metadata`)
and take a checkpoint's config from a same-named `.yaml` beside it (`ldm_inference_config`).
The `dreambooth.*` keys carry what this tool needs to reload and reproduce (identifier, class
noun, base model, the resolved training config).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from dreambooth.data.decode import image_extensions

STABILITY_IMPL = "https://github.com/Stability-AI/generative-models"


def architecture(family: str, prediction_type: str, lora: bool) -> str:
    """modelspec.architecture of a family (sd1, sd2, sdxl): SD 1.x, SD 2.x 512 (epsilon), SD 2.x 768-v
    or SDXL base (the names kohya sd-scripts' sai_model_spec writes), '/lora' for adapters."""
    if family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd1":
        arch = "stable-diffusion-v1"
    else:
        arch = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return arch + ("/lora" if lora else "")


def export_metadata(info: dict, config: dict, family: str, *, lora: bool,
                    implementation: str) -> dict[str, str]:
    """String-to-string metadata (safetensors allows nothing else) describing one export."""
    res = int(info["resolution"])
    prediction = info["prediction_type"]
    trigger = f"{info['identifier']} {info['class_noun']}"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(family, prediction, lora),
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


def base_model_version(family: str, prediction_type: str) -> str:
    """kohya's `ss_base_model_version`: sd_v1 or sd_v2, `_v` appended for v-prediction (the values
    sd-scripts' `get_model_version_str_for_sd1_sd2` writes), and its SDXL base value."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    version = "sd_v2" if family == "sd2" else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" else "")


def kohya_metadata(info: dict, config: dict, family: str, output_name: str) -> dict[str, str]:
    """The kohya `ss_*` keys of a LoRA file, written the way sd-scripts writes them (every value a
    string). `ss_tag_frequency` maps the image folder to caption tag counts; a DreamBooth caption is
    the instance prompt's subject phrase, once per photo, so the UIs show the trigger as a tag."""
    images = Path(str(config.get("data", {}).get("images") or "images"))
    trigger = f"{info['identifier']} {info['class_noun']}".lower()
    count = _count_images(images)
    res = int(info["resolution"])
    return {
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": base_model_version(family, info["prediction_type"]),
        "ss_output_name": output_name,
        "ss_sd_model_name": str(info["base_model"]),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(count),
        "ss_max_train_steps": str(info["steps"]),
        "ss_tag_frequency": json.dumps({images.name: {trigger: count}}),
    }


def _count_images(folder: Path) -> int:
    """Photos in the run's image folder; 1 when it is gone (the count only orders tags in the UIs)."""
    try:
        return max(1, sum(1 for p in folder.iterdir() if p.suffix.lower() in image_extensions()))
    except OSError:
        return 1


def ldm_inference_config(configs: dict, info: dict) -> dict:
    """The original (LDM) inference config of an SD 2 checkpoint, laid out as the Stability AI
    repo's `v2-inference-v.yaml`, with this model's sizes. A1111 and Forge build the model from it
    when it lies beside the checkpoint; `parameterization: v` is what makes them sample with
    v-prediction instead of guessing from the weights."""
    vae = configs["vae"]
    params = {"parameterization": "v"} if info["prediction_type"] == "v_prediction" else {}
    params.update({
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": int(info["resolution"]) // 8, "channels": vae["latent_channels"],
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": float(vae.get("scaling_factor", 0.18215)), "use_ema": False,
        "unet_config": _ldm_unet(configs["unet"]), "first_stage_config": _ldm_vae(vae),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}})
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _ldm_unet(unet: dict) -> dict:
    base, heads = unet["block_out_channels"][0], unet["attention_head_dim"]
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads  # diffusers' SD 2 lists heads per level
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"], "model_channels": base,
        "attention_resolutions": [2 ** i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")],
        "num_res_blocks": unet["layers_per_block"], "channel_mult": [c // base for c in unet["block_out_channels"]],
        "num_head_channels": base // heads, "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet.get("use_linear_projection")), "transformer_depth": 1,
        "context_dim": unet["cross_attention_dim"], "legacy": False}}


def _ldm_vae(vae: dict) -> dict:
    ch = vae["block_out_channels"][0]
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": vae["latent_channels"], "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": vae["latent_channels"], "resolution": 256,
            "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": ch,
            "ch_mult": [c // ch for c in vae["block_out_channels"]], "num_res_blocks": vae["layers_per_block"],
            "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}
