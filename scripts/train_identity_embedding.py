"""Train the toy world's identity embedding (``dreambooth/toyworld/embedding.py``), on CPU or a GPU.

Batches are groups of training-range identities (seeds 0-999,999), ``--views`` renders each
(random pose, context and JPEG); each group holds identities of two classes only and a quarter of
near-twins (one attribute changed), so most negatives are hard ones. ``--workers`` processes render
new groups while the main process trains on a buffer of recent ones with fresh degradations every
step: ``oracle.augment`` blur/noise/colour, and for a ``--vae-fraction`` of the views a round trip
through the toy model's VAE, the softening every generated image has. The learning rate follows a
cosine over the time budget.

    python scripts/train_identity_embedding.py --minutes 12
    python scripts/train_identity_embedding.py --minutes 7 --device cuda --workers 14 --ids 96
    python scripts/validate_identity_embedding.py      # held-out figures for MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from dreambooth.toyworld.embedding import (
    EMBEDDING_PATH,
    EmbeddingNet,
    load_embedding,
    save_embedding,
    supcon_loss,
)
from dreambooth.toyworld.identities import SPLITS, identity, render_views, variant
from dreambooth.toyworld.oracle import augment
from dreambooth.toyworld.render import CLASSES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget (wall clock)")
    p.add_argument("--out", type=Path, default=EMBEDDING_PATH, help="where the fp16 weights go")
    p.add_argument("--ids", type=int, default=48, help="identities per batch (group)")
    p.add_argument("--views", type=int, default=4, help="renders per identity in a batch")
    p.add_argument("--buffer", type=int, default=24, help="recent groups kept for training")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="render processes")
    p.add_argument("--vae-fraction", type=float, default=None,
                   help="share of views decoded from their toy-VAE latents, as generated images are (default "
                        "0.5 on a GPU, as the shipped weights; 0 on CPU, where the VAE would cost most steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="continue from these weights (a new warm-up "
                   "and cosine; use another --seed so that new identities are drawn)")
    p.add_argument("--first-group", type=int, default=0, help="index of the first group rendered "
                   "(groups are training seeds index*ids...; continuing runs start past the last one)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: at least 1 render process is needed")
    if args.vae_fraction is None:
        args.vae_fraction = 0.0 if args.device == "cpu" else 0.5
    return args


def render_group(args: tuple[int, int, int]) -> np.ndarray:
    """Group ``index``: (ids, views, 64, 64, 3) uint8 renders, deterministic in its arguments.

    Identities of two classes; seeds are consecutive training seeds from ``index * ids``, and
    every fourth identity is a near-twin of the one before it.
    """
    index, ids, views = args
    rng = np.random.default_rng([index, 3])
    classes = rng.choice(CLASSES, size=2, replace=False)
    start = SPLITS["train"][0] + (index * ids) % SPLITS["train"][1]
    group = []
    for i in range(ids):
        if i % 4 == 3:
            group.append(variant(group[-1], rng, key=start + i + SPLITS["train"][1] // 2))
        else:
            group.append(identity(start + i, str(classes[i % 2])))
    return np.stack([np.stack([np.asarray(v) for v in render_views(g, views, seed=index, soften=False)])
                     for g in group])


def load_vae(device: str):
    """The toy model's VAE (frozen), for the round trip that softens views like generated images."""
    from diffusers import AutoencoderKL

    from dreambooth.toyworld import WEIGHTS_DIR

    return AutoencoderKL.from_pretrained(str(WEIGHTS_DIR / "vae")).to(device).eval().requires_grad_(False)


@torch.no_grad()
def to_batch(group: np.ndarray, generator: torch.Generator, device: str = "cpu", vae=None,
             vae_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Degraded views (N, 3, 64, 64) in [-1, 1], channels-last, and their identity labels (N,).

    With ``vae``, a random ``vae_fraction`` of the views is encoded and decoded first (latent mean,
    as a sampler's final latent has no encoder noise).
    """
    ids, views = group.shape[:2]
    x = torch.from_numpy(group.reshape(ids * views, 64, 64, 3)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if vae is not None and vae_fraction > 0:
        pick = (torch.rand(len(x), generator=generator) < vae_fraction).to(device)
        if pick.any():
            x[pick] = vae.decode(vae.encode(x[pick]).latent_dist.mean).sample.clamp(-1, 1)
    gen = generator if device == "cpu" else torch.Generator(device).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)))
    x = augment(x, gen).contiguous(memory_format=torch.channels_last)
    return x, torch.arange(ids, device=device).repeat_interleave(views)


def lr_at(frac: float, peak: float, warmup: float = 0.03) -> float:
    """Linear warm-up over the first 3% of the time budget, then cosine to 5% of the peak."""
    if frac < warmup:
        return peak * frac / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warmup) / (1 - warmup)))))


def train(args: argparse.Namespace) -> tuple[EmbeddingNet, dict]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    net = load_embedding(args.init).net if args.init else EmbeddingNet()
    gen = torch.Generator().manual_seed(args.seed)
    budget, began = args.minutes * 60, time.time()
    buffer: list[np.ndarray] = []
    next_group, step, losses = args.first_group, 0, []
    with get_context("fork").Pool(args.workers) as pool:  # forked before CUDA starts here
        net = net.to(args.device, memory_format=torch.channels_last).train()
        vae = load_vae(args.device) if args.vae_fraction > 0 else None
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05)
        buffer.append(render_group((next_group, args.ids, args.views)))
        next_group += 1
        pending = []
        while (frac := (time.time() - began) / budget) < 1.0:
            while len(pending) < 2 * args.workers:  # keep every worker busy, groups in order
                pending.append(pool.apply_async(render_group, ((next_group + len(pending), args.ids, args.views),)))
            while pending and pending[0].ready():
                buffer = (buffer + [pending.pop(0).get()])[-args.buffer:]
                next_group += 1
            x, labels = to_batch(buffer[int(torch.randint(len(buffer), (1,), generator=gen))], gen,
                                 args.device, vae, args.vae_fraction)
            for g in opt.param_groups:
                g["lr"] = lr_at(frac, args.lr)
            loss = supcon_loss(net(x), labels, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 25 == 0:
                print(json.dumps({"step": step, "minutes": round((time.time() - began) / 60, 2),
                                  "loss": round(float(np.mean(losses[-25:])), 4), "groups": next_group}),
                      flush=True)
    info = {"steps": step, "groups": [args.first_group, next_group],
            "identities_seen": (next_group - args.first_group) * args.ids,
            "batch": args.ids * args.views, "minutes": args.minutes, "final_loss": float(np.mean(losses[-25:])),
            "lr": args.lr, "temperature": args.temperature, "seed": args.seed, "device": args.device,
            "vae_fraction": args.vae_fraction, "buffer": args.buffer, "threads": args.threads,
            "command": f"python scripts/train_identity_embedding.py --minutes {args.minutes:g} --ids {args.ids} "
                       f"--views {args.views} --buffer {args.buffer} --lr {args.lr:g} --device {args.device} "
                       f"--workers {args.workers} --vae-fraction {args.vae_fraction:g}"
                       + (f" --init {args.init} --first-group {args.first_group} --seed {args.seed}"
                          if args.init else "")}
    return net.eval().to(memory_format=torch.contiguous_format), info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    net, info = train(args)
    save_embedding(net, args.out, info)
    print(json.dumps({"saved": str(args.out), **info}))


if __name__ == "__main__":
    main()
