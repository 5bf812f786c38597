"""The oracle: a small CNN that says what a toy-world image shows (class, context, identity).

It plays the role that DINO/CLIP play for real photos: an automatic judge of DreamBooth outputs
(is the class still a dog, is it on the moon, is it *our* dog). It is trained on renders degraded
by blur, noise, colour jitter, JPEG and round-trips through the toy VAE, so that it judges the
diffusion model's softer outputs fairly rather than only the renderer's crisp edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from dreambooth.toyworld.dataset import IDENTITIES, ORACLE_CLASSES
from dreambooth.toyworld.render import CONTEXTS

ORACLE_PATH = Path(__file__).parent / "oracle.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convs with GroupNorm, then a 2x downsample."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.AvgPool2d(2),
    )


class OracleNet(nn.Module):
    """64x64 RGB in [-1, 1] -> logits of three heads: class (7), context (9), identity (5)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
            _block(4 * width, 4 * width),  # (B, 4w, 4, 4)
        )
        dim = 4 * width * 2  # mean- and max-pooled features
        self.heads = nn.ModuleDict({
            "class": nn.Linear(dim, len(ORACLE_CLASSES)),
            "context": nn.Linear(dim, len(CONTEXTS)),
            "identity": nn.Linear(dim, len(IDENTITIES)),
        })

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # max pooling keeps small details (collars)
        return {name: head(h) for name, head in self.heads.items()}


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Degrade a batch in [-1, 1] like a diffusion sample: blur, noise, brightness/contrast/colour shifts."""
    b = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=x.device, generator=generator)

    sigma = rand(b) * 1.2  # per-image Gaussian blur, sigma in [0, 1.2] px
    k = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = (w / w.sum(1, keepdim=True)).to(x.dtype)  # (B, 5)
    xb = x.reshape(1, b * 3, 64, 64)
    wk = w.repeat_interleave(3, 0)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), wk[:, None, None, :], groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), wk[:, None, :, None], groups=b * 3)
    x = xb.reshape(b, 3, 64, 64)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.85 + 0.3 * rand(b, 1, 1, 1)) + mean  # contrast
    x = x + 0.2 * (rand(b, 1, 1, 1) - 0.5) + 0.1 * (rand(b, 3, 1, 1) - 0.5)  # brightness, colour cast
    x = x + rand(b, 1, 1, 1) * 0.08 * torch.randn(x.shape, device=x.device, generator=generator)
    return x.clamp(-1, 1)


@dataclass(frozen=True)
class OracleLabel:
    """The oracle's verdict on one image, with the full probability vectors of each head."""

    class_name: str
    context: str
    identity: str
    class_probs: dict[str, float]
    context_probs: dict[str, float]
    identity_probs: dict[str, float]


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, 64, 64) float in [-1, 1]; other sizes are resized to 64 px."""
    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
                         if im.size != (64, 64) else im.convert("RGB")) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


class Oracle:
    """Wraps a trained OracleNet with name lookup; always runs on CPU in fp32 (it is tiny)."""

    def __init__(self, net: OracleNet) -> None:
        self.net = net.eval()

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities of each head, (N, n_labels) per head."""
        out: dict[str, list[torch.Tensor]] = {"class": [], "context": [], "identity": []}
        for i in range(0, len(images), batch_size):
            logits = self.net(to_tensor(images[i:i + batch_size]))
            for name, value in logits.items():
                out[name].append(value.softmax(-1))
        return {name: torch.cat(v) for name, v in out.items()}

    def classify(self, images: Sequence[Image.Image]) -> list[OracleLabel]:
        """One OracleLabel per image: the most probable class, context and identity."""
        if not images:
            return []
        p = self.probabilities(images)
        labels = []
        for i in range(len(images)):
            cp, xp, ip = p["class"][i].tolist(), p["context"][i].tolist(), p["identity"][i].tolist()
            labels.append(OracleLabel(
                ORACLE_CLASSES[int(np.argmax(cp))], CONTEXTS[int(np.argmax(xp))], IDENTITIES[int(np.argmax(ip))],
                dict(zip(ORACLE_CLASSES, cp)), dict(zip(CONTEXTS, xp)), dict(zip(IDENTITIES, ip)),
            ))
        return labels


def load_oracle(path: str | Path = ORACLE_PATH) -> Oracle:
    """The shipped oracle (fp16 on disk, fp32 in memory)."""
    net = OracleNet()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    net.load_state_dict(state)
    return Oracle(net)
