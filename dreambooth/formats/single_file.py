"""Single-file checkpoints in the original Stable Diffusion key layout (A1111 / ComfyUI files).

A file is converted once into an ordinary diffusers folder cached under
`cache_root()/single-file/<content hash>`, so every later load takes the diffusers-folder path
(detect, then load once). Converting needs the architecture's configs, which a bare
state dict does not carry; they come, in this order, from:

1. an explicit `config=` diffusers folder (or a `<file stem>.config/` folder next to the file),
2. the file's own metadata (our exports store every component config in `dreambooth.diffusers_configs`),
3. the shipped SD 1.5 / SD 2.1 config folders in `single_file_configs/`, matched by tensor shapes.

Pickle files (.ckpt/.pt/.pth/.bin) are read with `torch.load(weights_only=True)` only: a pickle can
run arbitrary code when loaded, so anything that needs more than tensors and plain containers is
refused with `UnsafeCheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from dreambooth.errors import ModelSourceError, Problem, UnsafeCheckpointError
from dreambooth.models.builtin import TOKENIZER_DIR, _write_atomically, cache_root, copy_tokenizer_files
from dreambooth.models.hashing import file_digest

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "single_file_configs"
CONFIGS_METADATA_KEY = "dreambooth.diffusers_configs"
UNET = "model.diffusion_model."
_PROBES = {  # key -> function of the (unet, vae, text) configs giving its expected shape
    UNET + "input_blocks.0.0.weight": lambda u, v, t: (u["block_out_channels"][0], u["in_channels"], 3, 3),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
        lambda u, v, t: (u["block_out_channels"][0], u["cross_attention_dim"]),
    "first_stage_model.encoder.conv_in.weight": lambda u, v, t: (v["block_out_channels"][0], v["in_channels"], 3, 3),
}
_TOKEN_EMBEDDING = {"sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                    "sd2": "cond_stage_model.model.token_embedding.weight"}
_SHIPPED_FAMILY = {"sd15": "sd1", "sd21": "sd2"}


def single_file_folder(path: Path, config: Path | None = None) -> Path:
    """The diffusers folder converted from a single-file checkpoint (converted on first use)."""
    path = Path(path)
    config = config or _sidecar_config(path)
    key = file_digest(path)
    if config is not None:
        key = hashlib.sha256((key + _folder_configs_digest(Path(config))).encode()).hexdigest()
    target = cache_root() / "single-file" / key
    if not (target / "model_index.json").exists():
        _write_atomically(target, lambda tmp: convert_single_file(path, tmp, config))
    return target


def convert_single_file(path: Path, out: Path, config: Path | None = None) -> None:
    """Write the diffusers folder of `path` into `out` (an empty folder)."""
    from diffusers import StableDiffusionPipeline

    work = Path(tempfile.mkdtemp(prefix="single-file-", dir=out.parent))
    try:
        weights, shapes, metadata = _safetensors_view(path, work)
        config_dir = work / "config"
        if config is not None:
            _copy_config_folder(Path(config), config_dir)
        else:
            write_config_folder(config_dir, shapes, metadata, str(path))
        pipe = StableDiffusionPipeline.from_single_file(
            str(weights), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32)
        pipe.save_pretrained(out, safe_serialization=True)
        copy_tokenizer_files(out / "tokenizer")
        (out / "single_file.json").write_text(json.dumps({"source": str(path), "metadata": metadata}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _safetensors_view(path: Path, work: Path) -> tuple[Path, dict[str, tuple], dict[str, str]]:
    """(safetensors path, {key: shape}, metadata); pickles are loaded safely and re-saved in `work`."""
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = read_header(path)
        return path, shapes, metadata
    from safetensors.torch import save_file

    state = load_pickle_state_dict(path)
    weights = work / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return weights, {k: tuple(v.shape) for k, v in state.items()}, {}


def read_header(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelSourceError(f"cannot read {path}", [Problem(str(path), f"not a valid safetensors file ({e})")]) from e


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol 2+ starts with b"\x80" and its protocol byte


def is_torch_file(path: Path) -> bool:
    """True when the file starts like a torch.save output: a zip archive or a pickle (legacy format).

    Lets random or corrupt bytes be called corrupt instead of "a pickle that needs arbitrary code".
    """
    head = _head(path)
    return head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _not_a_checkpoint(path: Path, why: str) -> ModelSourceError:
    return ModelSourceError(f"cannot read {path}", [Problem(str(path), f"{why}; the file is corrupt, truncated "
                                                            "or not a model. Download or export it again")])


def check_single_file(path: Path) -> None:
    """The loader's rules without converting: a readable file, only tensors in a pickle, and an
    SD 1.x/2.x layout with a config the converter can find. Reads the safetensors header only, and a
    zip-format pickle memory-mapped, so checking a multi-GB file takes about a second."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = read_header(path)
    else:
        shapes = {k: tuple(v.shape) for k, v in load_pickle_state_dict(path, lazy=True).items()}
        metadata = {}
    if CONFIGS_METADATA_KEY in metadata or _sidecar_config(path) is not None:
        return
    match_shipped_config(shapes, detect_family(shapes, str(path)), str(path))


def load_pickle_state_dict(path: Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a pickle checkpoint, refusing anything beyond tensors and plain containers.

    `lazy`: memory-map the tensors of a zip-format file instead of reading them (for checks).
    """
    if not is_torch_file(path):
        raise _not_a_checkpoint(path, "not a checkpoint file (neither a zip archive nor a pickle)")
    mmap = lazy and _head(path) == _ZIP_MAGIC
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower():  # the pickle stream itself is broken, nothing was refused
            raise _not_a_checkpoint(path, f"not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from e
        raise UnsafeCheckpointError(f"refusing to load {path}: it is a pickle that needs arbitrary code", [
            Problem(str(path), "loading pickle checkpoints can run any code their author put in them, so only "
                    "tensors and plain containers are accepted (torch.load weights_only=True), and this file "
                    f"holds more ({str(e).splitlines()[0][:200]}). If you trust its source, convert it once in "
                    "an isolated environment: sd = torch.load(PATH, weights_only=False); "
                    "sd = sd.get('state_dict', sd); safetensors.torch.save_file({k: v.contiguous() for k, v in "
                    "sd.items() if isinstance(v, torch.Tensor)}, 'model.safetensors'); then pass the .safetensors")]) from e
    except Exception as e:  # corrupt zip, truncated file
        raise _not_a_checkpoint(path, f"not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from e
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning-style {"state_dict": ..., "global_step": ...}
    if not isinstance(loaded, dict):
        raise ModelSourceError(f"cannot read {path}", [Problem(str(path), "expected a dict of tensors")])
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def detect_family(shapes: dict[str, tuple], where: str) -> str:
    """'sd1' or 'sd2' from the text encoder layout; a clear error for anything else."""
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        reason = "found SDXL keys (conditioner.embedders.*); only SD 1.x and 2.x single files are supported"
    elif any(k.startswith("lora_") or ".lora_A." in k or ".lora_down." in k for k in keys):
        reason = "this is a LoRA file, not a base model; pass it with --lora and a base --model"
    elif not any(k.startswith(UNET) for k in keys):
        reason = f"no model.diffusion_model.* keys; found e.g. {', '.join(keys[:3]) or 'nothing'}"
    elif _TOKEN_EMBEDDING["sd2"] in shapes:
        return "sd2"
    elif _TOKEN_EMBEDDING["sd1"] in shapes:
        return "sd1"
    else:
        reason = "no text encoder found (cond_stage_model.transformer.* or cond_stage_model.model.*)"
    raise ModelSourceError(f"{where} is not a Stable Diffusion 1.x/2.x checkpoint in the original layout",
                           [Problem(where, reason + _CONFIG_ADVICE)])


_CONFIG_ADVICE = ("; to use another architecture, put a diffusers folder of the same architecture (configs "
                  "and tokenizer, weights not needed) next to the file as <file stem>.config/, or pass "
                  "config= to single_file_folder, or convert with diffusers' from_single_file(..., config=...)")


def write_config_folder(dest: Path, shapes: dict[str, tuple], metadata: dict[str, str], where: str) -> None:
    """The diffusers config folder for a checkpoint: from its metadata, else a matching shipped one."""
    if CONFIGS_METADATA_KEY in metadata:
        write_configs(dest, json.loads(metadata[CONFIGS_METADATA_KEY]))
        return
    family = detect_family(shapes, where)
    name = match_shipped_config(shapes, family, where)
    _copy_config_folder(SHIPPED_CONFIGS / name, dest)
    prediction = _prediction_type(shapes, metadata)
    if prediction is not None:
        path = dest / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), prediction_type=prediction), indent=2))


def match_shipped_config(shapes: dict[str, tuple], family: str, where: str) -> str:
    """Name of the shipped config folder whose architecture has exactly these probe shapes."""
    found = {k: shapes.get(k) for k in [*_PROBES, _TOKEN_EMBEDDING[family]]}
    for name, fam in _SHIPPED_FAMILY.items():
        if fam != family:
            continue
        u, v, t = (json.loads((SHIPPED_CONFIGS / name / d / "config.json").read_text())
                   for d in ("unet", "vae", "text_encoder"))
        expected = {k: f(u, v, t) for k, f in _PROBES.items()}
        expected[_TOKEN_EMBEDDING[family]] = (t["vocab_size"], t["hidden_size"])
        if all(found[k] == s for k, s in expected.items()):
            return name
    shown = "; ".join(f"{k} {list(s) if s else 'missing'}" for k, s in found.items())
    raise ModelSourceError(f"{where}: no shipped config matches this {family} checkpoint", [
        Problem(where, f"found {shown}; the shipped configs are SD 1.5 and SD 2.1 (standard sizes, 4-channel "
                "UNet input, so inpainting and resized models do not match)" + _CONFIG_ADVICE)])


def _prediction_type(shapes: dict[str, tuple], metadata: dict[str, str]) -> str | None:
    """Self-described prediction type, if any; otherwise the shipped config's default applies
    (v_prediction for SD 2.x, as for SD 2.1 768; override with model.prediction_type)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec:
        return "v_prediction" if spec in ("v", "v_prediction") else "epsilon"
    return "v_prediction" if "v_pred" in shapes else None


def write_configs(dest: Path, configs: dict) -> None:
    """A diffusers config folder (no weights) from {unet, vae, text_encoder, scheduler, tokenizer} dicts."""
    files = {"unet/config.json": configs["unet"], "vae/config.json": configs["vae"],
             "text_encoder/config.json": configs["text_encoder"],
             "scheduler/scheduler_config.json": configs["scheduler"],
             "tokenizer/tokenizer_config.json": configs.get("tokenizer") or
             json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text()),
             "model_index.json": _model_index(configs["scheduler"]["_class_name"])}
    for rel, obj in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(obj, indent=2))
    copy_tokenizer_files(dest / "tokenizer")


def _model_index(scheduler_class: str) -> dict:
    return {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
            "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _copy_config_folder(src: Path, dest: Path) -> None:
    """Configs and tokenizer of a diffusers folder (weights skipped), plus the CLIP vocabulary."""
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt"):
            (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.relative_to(src))
    copy_tokenizer_files(dest / "tokenizer")


def _sidecar_config(path: Path) -> Path | None:
    side = path.with_suffix(".config")
    return side if (side / "unet" / "config.json").exists() else None


def _folder_configs_digest(folder: Path) -> str:
    files = sorted(f for f in folder.rglob("*.json") if f.is_file())
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
