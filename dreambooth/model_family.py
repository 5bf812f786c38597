"""The family of MODEL (sd15, sd21, sdxl, tiny, tiny-xl, toy or other) without loading its weights.

Built-ins are known by name; a diffusers folder by its unet/config.json; a single file by the
shapes in its header (or the configs it carries); a hub id by a list of well-known names, else by
the UNet config in the local hub cache, else it is unknown. The UNet's cross-attention width tells
the families apart: 768 (CLIP ViT-L) for SD 1.x, 1024 (OpenCLIP ViT-H) for SD 2.x; SDXL's UNet
takes `text_time` added embeddings (pooled text and image sizes) and 2048-wide context.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dreambooth.formats.config_folders import CONFIGS_METADATA_KEY
from dreambooth.formats.single_file import UNET_PREFIX, is_xl_layout
from dreambooth.formats.tensor_files import load_pickle_state_dict, read_header
from dreambooth.models.builtin import FULL_SIZE_RANDOM, SHIPPED_CONFIGS
from dreambooth.models.source import ModelSource, detect_source

KNOWN_HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd15", 512),
    "runwayml/stable-diffusion-v1-5": ("sd15", 512),
    "CompVis/stable-diffusion-v1-4": ("sd15", 512),
    "stabilityai/stable-diffusion-2-1": ("sd21", 768),
    "stabilityai/stable-diffusion-2": ("sd21", 768),
    "stabilityai/stable-diffusion-2-1-base": ("sd21", 512),
    "stabilityai/stable-diffusion-2-base": ("sd21", 512),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 1024),
}
SD_WIDTH = 320  # first UNet level's channels in SD 1.x and 2.x; narrower ones are test-sized models


@dataclass(frozen=True)
class ModelFamily:
    family: str  # sd15, sd21, tiny, toy, other, or unknown
    resolution: int | None  # native image size in pixels, when known
    how: str  # how it was told, for the plan's printout


def model_family(model: str) -> ModelFamily:
    """The family of MODEL; a missing or unreadable MODEL raises ModelSourceError as training would."""
    if model == "toy":
        return ModelFamily("toy", 64, "built-in")
    if model in FULL_SIZE_RANDOM:  # the shipped configs it is built from tell it
        return _from_folder(SHIPPED_CONFIGS / FULL_SIZE_RANDOM[model], "built-in, random weights")
    if model in ("tiny-random", "tiny-random-v"):
        return ModelFamily("tiny", 64, "built-in")
    if model == "tiny-random-xl":
        return ModelFamily("tiny-xl", 64, "built-in")  # not detect_source: it would build the model
    source = detect_source(model)
    if source.kind == "diffusers":
        return _from_folder(source.path, "unet/config.json")
    if source.kind == "single_file":
        return _from_single_file(source)
    if model in KNOWN_HUB_IDS:
        family, resolution = KNOWN_HUB_IDS[model]
        return ModelFamily(family, resolution, "known hub id")
    cached = _cached_hub_folder(source)
    if cached is not None:
        return _from_folder(cached, "unet/config.json in the hub cache")
    return ModelFamily("unknown", None, "hub id not known and not in the local cache")


def family_of_unet(unet: dict, vae: dict | None = None) -> tuple[str, int | None]:
    """(family, native resolution) from a diffusers UNet config (and its VAE's, for the scale)."""
    widths = unet.get("block_out_channels") or [0]
    cross = unet.get("cross_attention_dim")
    factor = 2 ** (len((vae or {}).get("block_out_channels") or [0] * 4) - 1)
    size = unet.get("sample_size")
    resolution = int(size) * factor if isinstance(size, int) else None
    xl = unet.get("addition_embed_type") == "text_time"
    if widths[0] < SD_WIDTH:
        return ("tiny-xl" if xl else "tiny"), resolution
    if xl:
        return ("sdxl" if cross == 2048 else "other"), resolution
    return {768: "sd15", 1024: "sd21"}.get(cross if isinstance(cross, int) else None, "other"), resolution


def _from_folder(folder: Path, how: str) -> ModelFamily:
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else None
    return ModelFamily(*family_of_unet(unet, vae), how)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # an unreadable config: the family is "other"; loading it would name the file
    return data if isinstance(data, dict) else {}


def _from_single_file(source: ModelSource) -> ModelFamily:
    """From the configs the file carries (our exports), a sidecar folder, or the tensor shapes."""
    path = source.path
    sidecar = path.with_suffix(".config")
    if (sidecar / "unet" / "config.json").is_file():
        return _from_folder(sidecar, "the file's .config folder")
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = read_header(path)
    else:
        shapes = {k: tuple(v.shape) for k, v in load_pickle_state_dict(path, lazy=True).items()}
        metadata = {}
    if CONFIGS_METADATA_KEY in metadata:
        configs = json.loads(metadata[CONFIGS_METADATA_KEY])
        return ModelFamily(*family_of_unet(configs.get("unet") or {}, configs.get("vae")), "configs in the file")
    return ModelFamily(family_of_shapes(shapes), None, "tensor shapes in the file")


def family_of_shapes(shapes: dict[str, tuple]) -> str:
    """The family of an original-layout checkpoint from its tensor shapes."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight") or (0,)
    unet = {"block_out_channels": [conv_in[0]], "cross_attention_dim": _first_context_width(shapes)}
    if is_xl_layout(shapes):
        unet["addition_embed_type"] = "text_time"
    return family_of_unet(unet)[0]


def _first_context_width(shapes: dict[str, tuple]) -> int | None:
    """The text width the UNet's first cross-attention takes (SD: input_blocks.1; SDXL, whose first
    level has no attention: input_blocks.4)."""
    blocks = sorted(int(k.split(".")[3]) for k in shapes if k.startswith(UNET_PREFIX + "input_blocks.")
                    and k.endswith(".1.transformer_blocks.0.attn2.to_k.weight"))
    key = f"{UNET_PREFIX}input_blocks.{blocks[0]}.1.transformer_blocks.0.attn2.to_k.weight" if blocks else None
    return shapes[key][1] if key else None


def _cached_hub_folder(source: ModelSource) -> Path | None:
    """The snapshot folder of a hub id whose UNet config is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.spec, "unet/config.json", revision=source.revision)
    return Path(found).parent.parent if isinstance(found, str) else None
