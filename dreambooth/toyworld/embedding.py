"""An identity embedding for the toy world: the role DINO plays in the DreamBooth paper.

Ruiz et al. (CVPR 2023, sec. 4.1) measure subject fidelity with DINO because, trained
self-supervised to tell images apart, it separates individuals of one class where CLIP does not.
The toy world has no DINO, so this small CNN is trained for exactly that with a supervised
contrastive loss (Khosla et al. 2020) over many procedural identities (``identities.py``), several
views each: different pose, context, JPEG and the oracle's blur/noise/colour degradations. Views
of one identity map close together, other identities (even of the same class) far apart, so it
scores any subject, including ones it never saw.

``scripts/train_identity_embedding.py`` trains it; the weights ship as
``identity_embedding.safetensors`` (fp16, about 0.7 MB); MODEL_CARD.md has the held-out figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dreambooth.toyworld.oracle import to_tensor

EMBEDDING_PATH = Path(__file__).parent / "identity_embedding.safetensors"
EMBEDDING_DIM = 128
WIDTHS = (24, 32, 64, 128)


def _stage(cin: int, cout: int, convs: int = 2) -> nn.Sequential:
    """``convs`` 3x3 convs with GroupNorm and SiLU, then a 2x downsample."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
    return nn.Sequential(*layers, nn.AvgPool2d(2))


class EmbeddingNet(nn.Module):
    """64x64 RGB in [-1, 1] -> (B, 128) unit vectors; about 330k parameters.

    Narrow at full resolution (one conv of 24 channels) so it trains on 2 CPU cores, but it keeps 64 px
    there because spots and collars are only 2-3 pixels wide.
    """

    def __init__(self, widths: Sequence[int] = WIDTHS, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        chans = (3, *widths)
        self.features = nn.Sequential(*[_stage(a, b, 1 if i == 0 else 2)  # one conv at 64 px: speed
                                        for i, (a, b) in enumerate(zip(chans, chans[1:]))])  # (B, w, 4, 4)
        self.head = nn.Linear(2 * widths[-1], dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # max pooling keeps small details
        return F.normalize(self.head(h), dim=-1)


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, eq. 2, "L_out") of unit embeddings z (N, D).

    For every anchor, the mean over its positives (same label, not itself) of
    -log softmax of similarity / temperature over all other samples.
    """
    n = len(z)
    sim = z @ z.T / temperature  # (N, N)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    if (count == 0).any():
        raise ValueError("supcon_loss needs at least two samples of every label in the batch")
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / count).mean()


class IdentityEmbedding:
    """A trained EmbeddingNet on CPU in fp32, with image conversion; ``embed`` gives (N, 128)."""

    def __init__(self, net: EmbeddingNet, info: dict | None = None) -> None:
        self.net = net.eval()
        self.info = info or {}

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 256) -> Tensor:
        """Unit embeddings (N, 128) of PIL images (any size: resized to 64 px like the oracle)."""
        if not images:
            return torch.empty(0, EMBEDDING_DIM)
        return torch.cat([self.net(to_tensor(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])


def save_embedding(net: EmbeddingNet, path: str | Path, info: dict) -> None:
    """fp16 weights with ``info`` (how it was trained, held-out figures) in the file's metadata."""
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"info": json.dumps(info)})


def load_embedding(path: str | Path = EMBEDDING_PATH) -> IdentityEmbedding:
    """The shipped identity embedding; a missing file is a FileNotFoundError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no identity-embedding weights; "
                                "python scripts/train_identity_embedding.py --minutes 12 makes them")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    net = EmbeddingNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return IdentityEmbedding(net, info)
