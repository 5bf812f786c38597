"""Single-file checkpoints: the original Stable Diffusion (LDM / CompVis) key layout, both directions.

A1111, ComfyUI and diffusers' `from_single_file` read one `.safetensors` whose keys follow the
original training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (text encoder: OpenAI CLIP for SD 1.x, OpenCLIP for SD 2.x); SDXL has its two
text encoders under `conditioner.embedders.0/1` (`formats.text_layouts`).

Writing (export): `pipeline_to_original` maps diffusers state dicts to that layout; these are pure
functions, and shapes change only in two places, both noted where they happen.

Reading: `single_file_folder` converts a file once, with diffusers' own converter
(`from_single_file`, the inverse of the mapping here), into an ordinary diffusers folder cached
under `cache_root()/single-file/<content hash>`, so every later load takes the diffusers-folder
path. Converting needs the architecture's configs (`formats.config_folders`), found by detecting
the family and matching tensor shapes against the shipped configs. tests/test_formats.py checks
that the two directions are inverses, tensor by tensor.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from dreambooth.atomic import replace_folder
from dreambooth.errors import ModelSourceError, Problem
from dreambooth.formats.config_folders import (
    CONFIGS_METADATA_KEY,
    SHIPPED_CONFIGS,
    copy_config_folder,
    folder_configs_digest,
    set_prediction_type,
    shipped_configs,
    sidecar_config,
    write_configs,
)
from dreambooth.formats.tensor_files import file_shapes, safetensors_view
from dreambooth.formats.text_layouts import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPEN_CLIP_PREFIX,
    XL_PREFIX,
    clip_to_original,
    open_clip_to_original,
    text_family,
    xl_text_to_original,
)
from dreambooth.models.builtin import cache_root, copy_tokenizer_files
from dreambooth.models.hashing import file_digest

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Writing: diffusers -> original layout --------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text and micro-conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap_first(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module name of `rest` ("conv1.weight") through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """Original name of one diffusers UNet key.

    LDM numbers blocks flatly: input_blocks[0] is conv_in, then per down level `layers_per_block`
    (resnet, attention) pairs and one downsampler; output_blocks hold `layers_per_block + 1` pairs
    per up level, the last with the upsampler appended (at index 2 after an attention, else 1).
    """
    n = layers_per_block + 1
    head, _, rest = key.partition(".")
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if head == "mid_block":
        kind, idx, tail = rest.split(".", 2)
        slot = 1 if kind == "attentions" else (0 if idx == "0" else 2)
        return f"middle_block.{slot}." + (_swap_first(tail, _UNET_RESNET) if kind == "resnets" else tail)
    level, kind, idx, tail = rest.split(".", 3)
    i, j = int(level), int(idx)
    if head == "down_blocks":
        if kind == "downsamplers":  # "conv.weight" -> "op.weight"
            return f"input_blocks.{(i + 1) * n}.0.op." + tail.split(".", 1)[1]
        block = f"input_blocks.{1 + i * n + j}"
    elif head == "up_blocks":
        if kind == "upsamplers":
            return f"output_blocks.{i * n + layers_per_block}.{2 if up_has_attention[i] else 1}.{tail}"
        block = f"output_blocks.{i * n + j}"
    else:
        raise KeyError(f"unexpected UNet key {key!r}")
    if kind == "resnets":
        return f"{block}.0." + _swap_first(tail, _UNET_RESNET)
    return f"{block}.1.{tail}"  # attentions: transformer internals keep their names


def unet_namer(config: dict):
    """`key -> original name` (without UNET_PREFIX) of the diffusers UNet keys of this config's layout."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only one value for all levels has an LDM layout")
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return lambda key: unet_key(key, lpb, up_attn)


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    name = unet_namer(config)
    return {UNET_PREFIX + name(k): v for k, v in state.items()}


def vae_key(key: str, num_levels: int) -> str:
    """Original name of one diffusers VAE key; decoder levels are numbered in reverse in LDM."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    part, _, rest = key.partition(".")
    if rest.startswith("mid_block."):
        kind, idx, tail = rest[len("mid_block."):].split(".", 2)
        if kind == "attentions":
            return f"{part}.mid.attn_1." + _swap_first(tail, _VAE_ATTN)
        return f"{part}.mid.block_{int(idx) + 1}.{tail}"
    for blocks, sampler, reverse in (("down_blocks", "downsamplers", False), ("up_blocks", "upsamplers", True)):
        if rest.startswith(blocks + "."):
            level, kind, idx, tail = rest[len(blocks) + 1:].split(".", 3)
            level = num_levels - 1 - int(level) if reverse else int(level)
            name = "upsample" if reverse else "downsample"
            if kind == sampler:
                return f"{part}.{'up' if reverse else 'down'}.{level}.{name}.{tail}"
            return f"{part}.{'up' if reverse else 'down'}.{level}.block.{idx}.{tail}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """VAE keys; the mid-block attention's linear q/k/v/proj_out become 1x1 convs: (C, C) -> (C, C, 1, 1)."""
    levels = len(config["block_out_channels"])
    out = {}
    for k, v in state.items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[VAE_PREFIX + new] = v
    return out


def pipeline_to_original(unet: dict, vae: dict, text: dict, configs: dict,
                         text_2: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole single-file state dict from the diffusers state dicts and their configs (SDXL:
    with the second text encoder's `text_2`)."""
    out = unet_to_original(unet, configs["unet"])
    out.update(vae_to_original(vae, configs["vae"]))
    if text_2 is not None:
        out.update(xl_text_to_original(text, text_2, configs["text_encoder_2"]["num_hidden_layers"]))
    elif text_family(configs["text_encoder"]) == "sd2":
        out.update(open_clip_to_original(text, configs["text_encoder"]["num_hidden_layers"]))
    else:
        out.update(clip_to_original(text))
    return {k: v.contiguous() for k, v in out.items()}


# Reading: original layout -> diffusers folder ------------------------------------------------------

_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_VAE_IN = VAE_PREFIX + "encoder.conv_in.weight"
_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's added embedding (pooled text, sizes)
_XL_CLIP_TOKENS = XL_CLIP_PREFIX + "embeddings.token_embedding.weight"
_TOKEN_EMBEDDING = {"sd1": CLIP_PREFIX + "embeddings.token_embedding.weight",
                    "sd2": OPEN_CLIP_PREFIX + "token_embedding.weight",
                    "sdxl": XL_OPEN_CLIP_PREFIX + "token_embedding.weight"}
_SD_PROBES = {  # key -> function of the configs {unet, vae, text_encoder[, text_encoder_2]} giving its shape
    _CONV_IN: lambda c: (c["unet"]["block_out_channels"][0], c["unet"]["in_channels"], 3, 3),
    UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
        lambda c: (c["unet"]["block_out_channels"][0], c["unet"]["cross_attention_dim"]),
    _VAE_IN: lambda c: (c["vae"]["block_out_channels"][0], c["vae"]["in_channels"], 3, 3),
}
_PROBES = {
    "sd1": {**_SD_PROBES, _TOKEN_EMBEDDING["sd1"]: lambda c: _token_shape(c["text_encoder"])},
    "sd2": {**_SD_PROBES, _TOKEN_EMBEDDING["sd2"]: lambda c: _token_shape(c["text_encoder"])},
    "sdxl": {  # SDXL's first level has no attention: its first cross-attention is input_blocks.4
        _CONV_IN: _SD_PROBES[_CONV_IN], _VAE_IN: _SD_PROBES[_VAE_IN],
        UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
            lambda c: (c["unet"]["block_out_channels"][1], c["unet"]["cross_attention_dim"]),
        _LABEL_EMB: lambda c: (4 * c["unet"]["block_out_channels"][0],
                               c["unet"]["projection_class_embeddings_input_dim"]),
        _XL_CLIP_TOKENS: lambda c: _token_shape(c["text_encoder"]),
        _TOKEN_EMBEDDING["sdxl"]: lambda c: _token_shape(c["text_encoder_2"])},
}
_SHIPPED_FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
_XL_PARTS = {UNET_PREFIX: "the UNet", VAE_PREFIX: "the VAE", XL_CLIP_PREFIX: "the CLIP ViT-L text encoder",
             XL_OPEN_CLIP_PREFIX: "the OpenCLIP ViT-bigG text encoder"}


def _token_shape(text_config: dict) -> tuple[int, int]:
    return (text_config["vocab_size"], text_config["hidden_size"])


_CONFIG_ADVICE = ("; to use another architecture, put a diffusers folder of the same architecture (configs "
                  "and tokenizer, weights not needed) next to the file as <file stem>.config/, or pass "
                  "config= to single_file_folder, or convert with diffusers' from_single_file(..., config=...)")


def single_file_folder(path: Path, config: Path | None = None) -> Path:
    """The diffusers folder converted from a single-file checkpoint (converted on first use)."""
    path = Path(path)
    config = config or sidecar_config(path)
    key = file_digest(path)
    if config is not None:
        key = hashlib.sha256((key + folder_configs_digest(Path(config))).encode()).hexdigest()
    target = cache_root() / "single-file" / key
    if not (target / "model_index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # another process converting the same file meanwhile made an identical folder: keep theirs
        replace_folder(target, lambda tmp: convert_single_file(path, tmp, config), if_exists="keep")
    return target


def convert_single_file(path: Path, out: Path, config: Path | None = None) -> None:
    """Write the diffusers folder of `path` into `out` (an empty folder), with diffusers' converter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    work = Path(tempfile.mkdtemp(prefix="single-file-", dir=out.parent))
    try:
        weights, shapes, metadata = safetensors_view(path, work)
        config_dir = work / "config"
        if config is not None:
            copy_config_folder(Path(config), config_dir)
        else:
            write_config_folder(config_dir, shapes, metadata, str(path))
        xl = (config_dir / "text_encoder_2").is_dir()
        parts = {"text_encoder_2": xl_text_encoder_2(weights, config_dir / "text_encoder_2", str(path))} if xl else {}
        pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_single_file(
            str(weights), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32, **parts)
        pipe.save_pretrained(out, safe_serialization=True)
        for tokenizer in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
            copy_tokenizer_files(out / tokenizer)
        (out / "single_file.json").write_text(json.dumps({"source": str(path), "metadata": metadata}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def xl_text_encoder_2(weights: Path, config: Path, where: str):
    """SDXL's second text encoder, converted by diffusers' OpenCLIP converter from its own keys only.

    `from_single_file` picks which embedder to read by hidden size, so when both encoders have the
    same width (the tiny SDXL) it would read the first one into the second: given this way, it
    does not convert the second encoder itself.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith(XL_OPEN_CLIP_PREFIX)}
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config))
    converted = convert_open_clip_checkpoint(model, state, prefix=XL_OPEN_CLIP_PREFIX)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelSourceError(f"{where}: the second text encoder does not match its config", [
            Problem(where, f"{XL_OPEN_CLIP_PREFIX}*: missing {', '.join(missing[:3]) or 'nothing'}; unexpected "
                    f"{', '.join(unexpected[:3]) or 'nothing'}" + _CONFIG_ADVICE)])
    return model


def check_single_file(path: Path) -> None:
    """The loader's rules without converting: a readable file, only tensors in a pickle, and an
    SD 1.x/2.x layout with a config the converter can find (headers only, so about a second)."""
    path = Path(path)
    shapes, metadata = file_shapes(path)
    if CONFIGS_METADATA_KEY in metadata or sidecar_config(path) is not None:
        return
    match_shipped_config(shapes, detect_family(shapes, str(path)), str(path))


def detect_family(shapes: dict[str, tuple], where: str) -> str:
    """'sd1', 'sd2' or 'sdxl' from the text encoder layout; a clear error for anything else."""
    keys = list(shapes)
    if is_xl_layout(shapes):
        return _xl_family(keys, where)
    if any(k.startswith("lora_") or ".lora_A." in k or ".lora_down." in k for k in keys):
        reason = "this is a LoRA file, not a base model; pass it with --lora and a base --model"
    elif not any(k.startswith(UNET_PREFIX) for k in keys):
        reason = f"no {UNET_PREFIX}* keys; found e.g. {', '.join(keys[:3]) or 'nothing'}"
    elif _TOKEN_EMBEDDING["sd2"] in shapes:
        return "sd2"
    elif _TOKEN_EMBEDDING["sd1"] in shapes:
        return "sd1"
    else:
        reason = "no text encoder found (cond_stage_model.transformer.* or cond_stage_model.model.*)"
    raise ModelSourceError(f"{where} is not a Stable Diffusion 1.x/2.x/XL checkpoint in the original layout",
                           [Problem(where, reason + _CONFIG_ADVICE)])


def is_xl_layout(shapes: dict[str, tuple]) -> bool:
    """SDXL keys: its text encoders, or its UNet's added embedding without SD 2's text encoder
    (SD 2 unCLIP also has a `label_emb`)."""
    return any(k.startswith(XL_PREFIX) for k in shapes) or (
        _LABEL_EMB in shapes and not any(k.startswith("cond_stage_model.") for k in shapes))


def _xl_family(keys: list[str], where: str) -> str:
    """'sdxl' for a complete SDXL base checkpoint; the refiner and partial files are named."""
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        reason = ("this is an SDXL refiner (one OpenCLIP text encoder under conditioner.embedders.0.model.*); "
                  "only the SDXL base layout (CLIP ViT-L and OpenCLIP ViT-bigG) is supported")
    else:
        missing = [f"{name} ({prefix}*)" for prefix, name in _XL_PARTS.items()
                   if not any(k.startswith(prefix) for k in keys)]
        if not missing:
            return "sdxl"
        reason = (f"an incomplete SDXL checkpoint: no {', '.join(missing)}; a file of the UNet alone cannot be "
                  "trained: use the complete base model")
    raise ModelSourceError(f"{where} is not a complete SDXL base checkpoint in the original layout",
                           [Problem(where, reason)])


def write_config_folder(dest: Path, shapes: dict[str, tuple], metadata: dict[str, str], where: str) -> None:
    """The diffusers config folder for a checkpoint: from its metadata, else a matching shipped one."""
    if CONFIGS_METADATA_KEY in metadata:
        write_configs(dest, json.loads(metadata[CONFIGS_METADATA_KEY]))
        return
    name = match_shipped_config(shapes, detect_family(shapes, where), where)
    copy_config_folder(SHIPPED_CONFIGS / name, dest)
    prediction = _prediction_type(shapes, metadata)
    if prediction is not None:
        set_prediction_type(dest, prediction)


def match_shipped_config(shapes: dict[str, tuple], family: str, where: str) -> str:
    """Name of the shipped config folder whose architecture has exactly these probe shapes."""
    probes = _PROBES[family]
    found = {k: shapes.get(k) for k in probes}
    for name, fam in _SHIPPED_FAMILY.items():
        if fam != family:
            continue
        configs = shipped_configs(name)
        if all(found[k] == probe(configs) for k, probe in probes.items()):
            return name
    shown = "; ".join(f"{k} {list(s) if s else 'missing'}" for k, s in found.items())
    raise ModelSourceError(f"{where}: no shipped config matches this {family} checkpoint", [
        Problem(where, f"found {shown}; the shipped configs are SD 1.5, SD 2.1 and SDXL base (standard sizes, "
                "4-channel UNet input, so inpainting and resized models do not match)" + _CONFIG_ADVICE)])


def _prediction_type(shapes: dict[str, tuple], metadata: dict[str, str]) -> str | None:
    """Self-described prediction type, if any; otherwise the shipped config's default applies
    (v_prediction for SD 2.x, as for SD 2.1 768; override with model.prediction_type)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec:
        return "v_prediction" if spec in ("v", "v_prediction") else "epsilon"
    return "v_prediction" if "v_pred" in shapes else None
