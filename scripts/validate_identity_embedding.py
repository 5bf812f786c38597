"""Held-out figures of the identity embedding, for MODEL_CARD.md (CPU, a few minutes).

All identities come from the validation seed range (1,100,000-1,199,999), which neither training
nor the fidelity calibration uses. Prints one JSON line per part:

- pairs: AUC of cosine similarity for same- vs different-identity pairs of degraded views (all
  pairs, and different identities of the same class only), and against near-twins (one attribute
  changed);
- top1: nearest-neighbour retrieval of the identity among all other views;
- fidelity: normalised subject fidelity (toyworld.fidelity) of an identity's own degraded renders
  and of another identity of its class, for render-calibrated and photos-only references;
- base_drift (with --base-model): language drift of plain class-prompt images from the base
  model against each built-in subject, the rate an untrained model must show as about 0.

    python scripts/validate_identity_embedding.py [--weights PATH] [--base-model toy]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dreambooth.toyworld.embedding import EMBEDDING_PATH, load_embedding
from dreambooth.toyworld.fidelity import subject_reference
from dreambooth.toyworld.identities import identities, render_views, subject_identity, variant
from dreambooth.toyworld.render import CLASSES, SUBJECT_SPECS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=EMBEDDING_PATH)
    p.add_argument("--ids", type=int, default=300, help="validation identities for pairs and top-1")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--subjects", type=int, default=48, help="validation identities for the fidelity score")
    p.add_argument("--base-model", default=None, help="also measure base-model drift (e.g. toy)")
    p.add_argument("--base-images", type=int, default=32, help="class-prompt images per built-in subject")
    return p.parse_args(argv)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = torch.cat([positive, negative]).double()
    ranks = scores.argsort().argsort().double() + 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_figures(emb, args) -> dict:
    ids = identities("validation", args.ids)
    z = emb.embed([v for i in ids for v in render_views(i, args.views, seed=5)])  # (N*V, D)
    label = torch.arange(len(ids)).repeat_interleave(args.views)
    cls = torch.tensor([CLASSES.index(i.class_name) for i in ids]).repeat_interleave(args.views)
    sim = z @ z.T
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), 1)
    same = (label[:, None] == label[None]) & upper
    diff = (label[:, None] != label[None]) & upper
    same_class = diff & (cls[:, None] == cls[None])
    masked = sim.masked_fill(torch.eye(len(z), dtype=torch.bool), -2)
    rng = np.random.default_rng(9)
    twins = [variant(i, rng, key=i.key + 50_000) for i in ids[:100]]
    zt = emb.embed([v for t in twins for v in render_views(t, args.views, seed=6)]).reshape(100, args.views, -1)
    zo = z.reshape(len(ids), args.views, -1)[:100]
    twin_sims = torch.einsum("nvd,nwd->nvw", zo, zt).flatten()
    own_sims = torch.cat([(zo[n] @ zo[n].T)[torch.triu_indices(args.views, args.views, 1).unbind()]
                          for n in range(100)])
    return {
        "identities": len(ids), "views": args.views,
        "auc_all": auc(sim[same], sim[diff]), "auc_same_class": auc(sim[same], sim[same_class]),
        "auc_near_twin": auc(own_sims, twin_sims),
        "top1": float((label[masked.argmax(1)] == label).float().mean()),
        "cos_same": float(sim[same].mean()), "cos_diff_same_class": float(sim[same_class].mean()),
    }


def fidelity_figures(emb, args) -> dict:
    """Own vs other scores per class-balanced validation identity, for both calibrations."""
    out: dict[str, list[float]] = {k: [] for k in ("own", "other", "own_photos_only", "other_photos_only")}
    for k, cls in enumerate(CLASSES):
        subjects = identities("validation", args.subjects // len(CLASSES) + 1, cls, start=50_000 + 100 * k)
        for a, b in zip(subjects, subjects[1:]):
            photos = render_views(a, 5, ("plain", "table", "city"), seed=11, jpeg=0, soften=False)
            own, other = render_views(a, 8, seed=12), render_views(b, 8, seed=12)
            for suffix, ident in (("", a), ("_photos_only", None)):
                ref = subject_reference(emb, cls, photos, ident)
                out["own" + suffix].append(ref.score(own))
                out["other" + suffix].append(ref.score(other))
    return {k: {"mean": float(np.mean(v)), "min" if k.startswith("own") else "max":
                float(np.min(v) if k.startswith("own") else np.max(v))} for k, v in out.items()}


def base_drift(emb, args) -> dict:
    """Drift of the base model's "a photo of a {class}" images against each built-in subject."""
    from dreambooth.demo import PHOTO_CONTEXTS
    from dreambooth.generate import GenerationSettings, load_for_generation, make_generation_pipeline
    from dreambooth.sampling import sample_images
    from dreambooth.toyworld import render_subject

    pipe = make_generation_pipeline(load_for_generation(args.base_model, device="cpu"), GenerationSettings())
    out = {}
    for name, spec in SUBJECT_SPECS.items():
        prompt = f"a photo of a {spec.class_name}"
        images = sample_images(pipe, [prompt] * args.base_images, list(range(args.base_images)),
                               steps=25, guidance=7.5, resolution=64)
        photos = [render_subject(name, c, seed=100 + i) for i, c in enumerate(PHOTO_CONTEXTS)]
        ref = subject_reference(emb, spec.class_name, photos, subject_identity(name))
        hits = ref.is_subject(images)
        out[name] = {"drift": sum(hits) / len(hits), "images": len(hits),
                     "fidelity_of_class_images": ref.score(images)}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    emb = load_embedding(args.weights)
    print(json.dumps({"weights": str(args.weights), "trained": emb.info}), flush=True)
    print(json.dumps({"pairs": pair_figures(emb, args)}), flush=True)  # one line per part, as it ends
    print(json.dumps({"fidelity": fidelity_figures(emb, args)}), flush=True)
    if args.base_model:
        print(json.dumps({"base_drift": base_drift(emb, args)}), flush=True)


if __name__ == "__main__":
    main()
