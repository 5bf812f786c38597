"""Load the parts of a Stable Diffusion model that training and generation need."""
from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.errors import ModelSourceError, Problem
from dreambooth.formats.tensor_files import read_header
from dreambooth.models.hashing import file_digest
from dreambooth.models.source import ModelSource, detect_source, resolve_hub

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass
class Components:
    """Tokenizer(s), text encoder(s), VAE, UNet and the training noise scheduler of one base model.

    SDXL has a second tokenizer and text encoder (OpenCLIP ViT-bigG with its projection, whose
    pooled output conditions the UNet); SD 1.x/2.x leave them None.
    """

    tokenizer: object  # transformers.CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers.CLIPTextModel
    vae: torch.nn.Module  # diffusers.AutoencoderKL
    unet: torch.nn.Module  # diffusers.UNet2DConditionModel
    noise_scheduler: object  # diffusers.DDPMScheduler with the model's betas and prediction type
    source: ModelSource
    folder: Path  # the diffusers folder the parts came from
    tokenizer_2: object | None = None  # SDXL
    text_encoder_2: torch.nn.Module | None = None  # SDXL: transformers.CLIPTextModelWithProjection

    def to(self, device, dtype: torch.dtype | None = None) -> "Components":
        """Move the networks (in place) and return self."""
        for part in (self.unet, self.vae, *self.text_encoders):
            part.to(device, dtype)
        return self

    @property
    def is_xl(self) -> bool:
        """SDXL: two text encoders, and a UNet conditioned on the pooled text and image sizes."""
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def resolution(self) -> int:
        """Native image size: UNet sample size times the VAE's downsampling factor."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor


def model_folder(source: ModelSource) -> Path:
    """The local diffusers folder behind a source (downloading a hub id when allowed)."""
    if source.kind in ("builtin", "diffusers"):
        return source.path
    if source.kind == "hub":
        return resolve_hub(source)
    # converted once, cached by content hash. Imported here: formats.single_file imports
    # dreambooth.models.builtin, whose package __init__ imports this module
    from dreambooth.formats.single_file import single_file_folder

    return single_file_folder(source.path)


def load_components(model: str | ModelSource, *, dtype: torch.dtype = torch.float32,
                    prediction_type: str | None = None) -> Components:
    """Load every part of MODEL once; `prediction_type` overrides the scheduler's when given."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = detect_source(model) if isinstance(model, str) else model
    folder = model_folder(source)
    xl = (folder / "text_encoder_2").is_dir() or (folder / "tokenizer_2").is_dir()
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    parts += ("text_encoder_2", "tokenizer_2") if xl else ()
    missing = [d for d in parts if not (folder / d).is_dir()]
    if missing:
        raise ModelSourceError(
            f"{source.spec} is missing parts of a Stable Diffusion model",
            [Problem(str(folder / d), "missing folder") for d in missing],
        )
    check_weight_files(folder, source.spec)
    with _named_load_errors(source.spec, folder):
        scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler")
        if prediction_type is not None:
            scheduler_config["prediction_type"] = prediction_type
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            noise_scheduler=DDPMScheduler.from_config(scheduler_config),
            source=source,
            folder=folder,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2") if xl else None,
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", dtype=dtype) if xl else None,
        )


def check_weight_files(folder: Path, spec: str) -> None:
    """Read the header of every safetensors file of the model, naming each corrupt or truncated one.

    The libraries' own errors ("Unable to load weights from checkpoint file") come as a traceback
    and stop at the first bad file; the header read costs milliseconds.
    """
    problems = []
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        try:
            read_header(path)
        except ModelSourceError as err:
            problems += [Problem(p.where, p.message + "; the file is truncated or corrupt: download or export "
                                 "the model again") for p in err.problems]
    if problems:
        raise ModelSourceError(f"{spec} has {len(problems)} unreadable weight file(s)", problems)


@contextlib.contextmanager
def _named_load_errors(spec: str, folder: Path):
    """Loader failures on bad files (a corrupt .bin, a broken config.json) as a named error."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelSourceError(f"cannot load {spec}", [
            Problem(str(folder), f"{type(e).__name__}: {str(e).splitlines()[0][:300]}; a file of the model is "
                    "missing or corrupt: download or export it again")]) from e


def model_identity(folder: Path) -> str:
    """A content hash of a diffusers folder's weights and configs.

    Class images are keyed by it, so a changed model never reuses stale class images (peers count
    files in a folder instead). Each file's hash is memoised by size and modification time, so
    SD 1.5's ~4 GB are read once.
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and _counts_for_identity(p))
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(folder)}:{file_digest(p)}\n".encode())
    return digest.hexdigest()


def hash_in_background(folder: Path) -> threading.Thread:
    """Start `model_identity(folder)` in a daemon thread, so the hash of a model not seen before (SD 1.5:
    4 GB, about 2.5 s) runs while the models are moved to the device; the class-image key's own call
    then finds each file's hash done or waits for it. A failure here is left to that call to report."""
    def run():
        with contextlib.suppress(Exception):
            model_identity(folder)
    thread = threading.Thread(target=run, name="model-identity", daemon=True)
    thread.start()
    return thread


def _counts_for_identity(path: Path) -> bool:
    # Weights and the configs that change what the weights compute; not READMEs or caches.
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith("config.json") or path.name in (
        "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer.json")
