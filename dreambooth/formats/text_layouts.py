"""Text encoders in the original single-file layouts, from the transformers state dicts.

SD 1.x keeps OpenAI CLIP ViT-L in the transformers layout under `cond_stage_model.transformer.`;
SD 2.x stores OpenCLIP ViT-H in OpenCLIP's own layout under `cond_stage_model.model.`. SDXL has
both kinds: CLIP ViT-L (transformers layout) under `conditioner.embedders.0.transformer.` and
OpenCLIP ViT-bigG (OpenCLIP layout, with its projection) under `conditioner.embedders.1.model.`.
"""
from __future__ import annotations

import torch

CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x, OpenAI CLIP ViT-L/14
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x, OpenCLIP ViT-H/14
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL, CLIP ViT-L/14
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL, OpenCLIP ViT-bigG/14
XL_PREFIX = "conditioner.embedders."

_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def text_family(text_config: dict) -> str:
    """'sd2' for OpenCLIP-style text encoders (GELU), 'sd1' for OpenAI CLIP (quick GELU)."""
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


def clip_to_original(state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """CLIP ViT-L in the transformers layout under `prefix` (transformers 5 saves CLIPTextModel
    without the `text_model.` level, older versions with it)."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], num_layers: int,
                          prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """OpenCLIP layout: q/k/v fused into `attn.in_proj_*` (3D, D) in that order,
    `transformer.resblocks.N`, `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `ln_final`, `text_projection`.

    OpenCLIP computes `x @ text_projection`, so an encoder with a projection (SDXL's second) stores
    the transpose of the transformers Linear weight. SD 2.x has none: it uses the penultimate layer
    of OpenCLIP ViT-H (24 layers), so diffusers keeps 23. For a 23-layer encoder a zero layer 24 and
    an identity `text_projection` are added, so clients that build the full OpenCLIP model find
    every key; neither changes the penultimate output that SD uses.
    """
    projection = state.get("text_projection.weight")
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + new: state[old] for old, new in _OPEN_CLIP_TOP.items()}
    for n in range(num_layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    if projection is not None:
        out[prefix + "text_projection"] = projection.T
        return out
    width = state["embeddings.token_embedding.weight"].shape[1]
    dtype = state["embeddings.token_embedding.weight"].dtype
    if num_layers == 23:
        last = f"{prefix}transformer.resblocks.22."
        out.update({f"{prefix}transformer.resblocks.23.{k[len(last):]}": torch.zeros_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
    out[prefix + "text_projection"] = torch.eye(width, dtype=dtype)
    return out


def xl_text_to_original(text: dict[str, torch.Tensor], text_2: dict[str, torch.Tensor],
                        num_layers_2: int) -> dict[str, torch.Tensor]:
    """SDXL's two text encoders under `conditioner.embedders.0/1`."""
    return {**clip_to_original(text, XL_CLIP_PREFIX),
            **open_clip_to_original(text_2, num_layers_2, XL_OPEN_CLIP_PREFIX)}
