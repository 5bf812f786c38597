"""LoRA weight files: apply them to a pipeline whatever layout they are in, and convert layouts.

Layouts (per adapted linear layer, D_out x D_in weight, rank r):
- diffusers/PEFT: `unet.<module>.lora_A.weight` (r, D_in), `unet.<module>.lora_B.weight` (D_out, r),
  `text_encoder.text_model.<module>...`; alpha in the `lora_adapter_metadata` safetensors metadata.
  Older diffusers files say `lora.down`/`lora.up` (UNet) and `lora_linear_layer.down`/`.up` (text).
- kohya (sd-scripts, read by A1111 and ComfyUI): `lora_unet_<module with _>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha`, text encoder under `lora_te_text_model_...`. For SDXL,
  kohya names UNet modules as in the original layout (`lora_unet_input_blocks_4_1_...`, its UNet
  class keeps those names) and the two text encoders `lora_te1_` and `lora_te2_`.
Both compute W + (alpha / r) * B @ A.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth.errors import ModelSourceError, Problem
from dreambooth.formats.single_file import unet_namer

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' load_lora_weights reads
_DOWN_UP = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
            ".lora_linear_layer.down.weight": ".lora_A.weight", ".lora_linear_layer.up.weight": ".lora_B.weight",
            ".lora_A.weight": ".lora_A.weight", ".lora_B.weight": ".lora_B.weight"}
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_XL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def load_lora_into_pipeline(pipe, path: Path, *, scale: float = 1.0, adapter_name: str = "subject") -> None:
    """Apply a LoRA file (diffusers/PEFT or kohya layout: diffusers converts kohya keys itself)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ModelSourceError(f"cannot use LoRA file {path}", [
            Problem(str(path), "expected an existing .safetensors LoRA file (pickle files are not loaded)")])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[scale])


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def to_peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any diffusers-family layout -> `unet.<module>.lora_A/B.weight`, `text_encoder.text_model.<module>...`.

    The `text_model.` level is written even though transformers 5 dropped it from CLIPTextModel:
    older clients need it and diffusers strips it when the model has no such level.
    """
    out = {}
    for key, value in state.items():
        suffix = next((s for s in _DOWN_UP if key.endswith(s)), None)
        part = key.split(".", 1)[0]
        if suffix is None or part not in _KOHYA_XL_PREFIX:
            raise ValueError(f"not a diffusers/PEFT LoRA key: {key!r}")
        module = key[len(part) + 1:-len(suffix)]
        if part.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module
        out[f"{part}.{module}{_DOWN_UP[suffix]}"] = value
    return out


def peft_to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, float],
                  xl_unet: dict | None = None) -> dict[str, torch.Tensor]:
    """PEFT layout -> kohya layout; `alphas` maps each part to its lora_alpha. `xl_unet`: the SDXL
    UNet's config, whose modules kohya names in the original layout."""
    prefixes = _KOHYA_XL_PREFIX if xl_unet else _KOHYA_PREFIX
    original = unet_namer(xl_unet) if xl_unet else None
    out = {}
    for key, value in to_peft_layout(state).items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        if original and part == "unet":
            module = original(module + ".weight").removesuffix(".weight")
        name = prefixes[part] + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alphas[part]), dtype=value.dtype)
    return out


def adapter_metadata(state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, str]:
    """The `lora_adapter_metadata` entry that tells diffusers each part's rank, alpha and targets,
    so alpha != rank is applied at the trained scale."""
    packed = {}
    for part in _KOHYA_XL_PREFIX:
        downs = {k: v for k, v in state.items() if k.startswith(part + ".") and k.endswith(".lora_A.weight")}
        if not downs:
            continue
        targets = sorted({k[:-len(".lora_A.weight")].rsplit(".", 1)[-1] if not k.endswith("to_out.0.lora_A.weight")
                          else "to_out.0" for k in downs})
        packed.update({f"{part}.r": int(next(iter(downs.values())).shape[0]),
                       f"{part}.lora_alpha": float(alphas[part]), f"{part}.target_modules": targets})
    return {LORA_ADAPTER_METADATA_KEY: json.dumps(packed, sort_keys=True)}


@torch.no_grad()
def merge_lora(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str, alpha: float) -> int:
    """Add (alpha / r) * B @ A to every adapted linear weight of `module` (the `part` of a PEFT-layout
    state dict); returns how many layers changed. Done by hand rather than by fusing adapters so the
    merged export does not depend on how a loader guesses alpha."""
    state = {k[len(part) + 1:]: v for k, v in to_peft_layout(state).items() if k.startswith(part + ".")}
    flat = not hasattr(module, "text_model")  # transformers 5 CLIPTextModel has no text_model level
    merged = 0
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[:-len(".lora_A.weight")]
        up = state[path + ".lora_B.weight"]
        target = module.get_submodule(path.removeprefix("text_model.") if flat else path)
        delta = (alpha / down.shape[0]) * (up.double() @ down.double())  # (D_out, r) @ (r, D_in)
        target.weight += delta.to(target.weight.dtype)
        merged += 1
    return merged
