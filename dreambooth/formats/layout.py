"""Diffusers -> original Stable Diffusion (LDM / CompVis) key layout, for single-file checkpoints.

A1111, ComfyUI and diffusers' `from_single_file` read one `.safetensors` whose keys follow the
original training code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (text encoder: OpenAI CLIP for SD 1.x, OpenCLIP for SD 2.x). These are pure
functions over state dicts; shapes change only in two places, both noted where they happen.
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x, OpenAI CLIP ViT-L/14
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x, OpenCLIP ViT-H/14

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
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


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only one value for all levels has an LDM layout")
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return {UNET_PREFIX + unet_key(k, lpb, up_attn): v for k, v in state.items()}


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


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x text encoder: the transformers layout under `cond_stage_model.transformer.text_model.`
    (transformers 5 saves CLIPTextModel without the `text_model.` level, older versions with it)."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()
            if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD 2.x text encoder in the OpenCLIP layout: q/k/v fused into `attn.in_proj_*` (3D, D) in that
    order, `transformer.resblocks.N`, `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `ln_final`.

    SD 2.x uses the penultimate layer of OpenCLIP ViT-H (24 layers), so diffusers keeps 23. For a
    23-layer encoder a zero layer 24 and an identity `text_projection` are added, so clients that
    build the full OpenCLIP model find every key; neither changes the penultimate output that SD uses.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {OPEN_CLIP_PREFIX + new: state[old] for old, new in _OPEN_CLIP_TOP.items()}
    for n in range(num_layers):
        src, dst = f"encoder.layers.{n}.", f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    width = state["embeddings.token_embedding.weight"].shape[1]
    dtype = state["embeddings.token_embedding.weight"].dtype
    if num_layers == 23:
        last = {k[len(f"{OPEN_CLIP_PREFIX}transformer.resblocks.22."):]: v for k, v in out.items()
                if k.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.22.")}
        out.update({f"{OPEN_CLIP_PREFIX}transformer.resblocks.23.{k}": torch.zeros_like(v) for k, v in last.items()})
    out[OPEN_CLIP_PREFIX + "text_projection"] = torch.eye(width, dtype=dtype)
    return out


def text_family(text_config: dict) -> str:
    """'sd2' for OpenCLIP-style text encoders (GELU), 'sd1' for OpenAI CLIP (quick GELU)."""
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


def pipeline_to_original(unet: dict, vae: dict, text: dict, configs: dict) -> dict[str, torch.Tensor]:
    """The whole single-file state dict from the three diffusers state dicts and their configs."""
    out = unet_to_original(unet, configs["unet"])
    out.update(vae_to_original(vae, configs["vae"]))
    if text_family(configs["text_encoder"]) == "sd2":
        out.update(open_clip_to_original(text, configs["text_encoder"]["num_hidden_layers"]))
    else:
        out.update(clip_to_original(text))
    return {k: v.contiguous() for k, v in out.items()}
