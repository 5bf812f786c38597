"""Do fewer sampler steps keep the prior? Class images of the toy base model per sampler setting,
against the diffusers pipeline's default (PNDM, 50 steps) on the same prompts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_class_sampler.py --out toy-class-sampler.json

For every toy class, `--num` images of the toy preset's class prompt ("a photo of a {class}",
guidance 5) per setting, seeds 0.. per image. Measured on each set:

- class accuracy: the oracle's class head names the class;
- variety: 1 - mean pairwise cosine similarity of identity embeddings (how many different-looking
  individuals the set holds: the class's spread that prior preservation is meant to keep);
- distance to the PNDM 50 set: kernel MMD^2 (unbiased, RBF kernel at the median pairwise
  distance of the reference set) of the identity embeddings, and the distance of their means.

A second PNDM 50 set from other seeds gives the floor these distances have between two sets of
the same sampler: a setting within that floor draws from the same distribution as far as 64-image
sets can tell.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreambooth.models import load_components  # noqa: E402
from dreambooth.sampling import make_pipeline  # noqa: E402
from dreambooth.toyworld.embedding import load_embedding  # noqa: E402
from dreambooth.toyworld.oracle import load_oracle  # noqa: E402
from dreambooth.toyworld.render import CLASSES  # noqa: E402

SETTINGS = [("pndm", 50, 0), ("pndm", 50, 10_000), ("dpmpp", 25, 0), ("dpmpp", 20, 0), ("dpmpp", 15, 0),
            ("dpmpp", 12, 0), ("dpmpp", 10, 0), ("dpmpp", 8, 0)]  # (sampler, steps, first seed)


def sample(components, sampler: str, steps: int, prompt: str, seeds: range, batch: int = 32) -> list:
    pipe = make_pipeline(components, sampler)
    images = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk]
        images += pipe(prompt, num_images_per_prompt=len(chunk), num_inference_steps=steps, guidance_scale=5.0,
                       generator=generators, height=64, width=64).images
    return images


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared MMD with an RBF kernel."""
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def variety(z: torch.Tensor) -> float:
    sim = z @ z.T
    n = len(z)
    return float(1 - (sim.sum() - sim.diag().sum()) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--classes", default=",".join(CLASSES))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    components = load_components("toy")
    oracle, embedding = load_oracle(), load_embedding()
    rows = []
    for class_name in args.classes.split(","):
        prompt = f"a photo of a {class_name}"
        sets = {}
        for sampler, steps, seed in SETTINGS:
            began = time.perf_counter()
            images = sample(components, sampler, steps, prompt, range(seed, seed + args.num))
            labels = oracle.classify(images)
            sets[(sampler, steps, seed)] = embedding.embed(images)
            rows.append({"class": class_name, "sampler": sampler, "steps": steps, "seed": seed,
                         "seconds": round(time.perf_counter() - began, 1),
                         "class_accuracy": sum(lab.class_name == class_name for lab in labels) / len(labels),
                         "variety": variety(sets[(sampler, steps, seed)])})
            print(json.dumps(rows[-1]), flush=True)
        reference = sets[SETTINGS[0]]
        bandwidth = float(torch.cdist(reference, reference).median())
        for row in rows[-len(SETTINGS):]:
            z = sets[(row["sampler"], row["steps"], row["seed"])]
            row["mmd2_to_pndm50"] = mmd2(z, reference, bandwidth)
            row["mean_distance_to_pndm50"] = float((z.mean(0) - reference.mean(0)).norm())
    args.out.write_text(json.dumps({"machine": platform.platform(), "num": args.num, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
