"""Measure the toy base model with the oracle: does "a photo of a {class} {context}" give that class there?

Used at the end of pretraining (on the GPU) and again on CPU on the shipped fp16 weights; the
figures go in MODEL_CARD.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from dreambooth.toyworld.oracle import Oracle
from dreambooth.toyworld.render import CLASSES, CONTEXTS, context_phrase


@dataclass(frozen=True)
class PromptResult:
    class_name: str
    context: str
    images: list[Image.Image]
    class_hits: int
    context_hits: int


def eval_prompt(class_name: str, context: str) -> str:
    """The evaluation prompt of one (class, context) cell, in the SD prompt style."""
    return f"a photo of a {class_name} {context_phrase(context)}"


@torch.no_grad()
def sample_prompts(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 6.0,
                   batch_size: int = 64) -> list[Image.Image]:
    """Generate one image per prompt with a fixed seed per batch, so runs are comparable."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generator, height=64, width=64, output_type="pil")
        images.extend(out.images)
    return images


def evaluate_base_model(pipe, oracle: Oracle, per_prompt: int = 4, seed: int = 0, steps: int = 25,
                        guidance: float = 6.0, batch_size: int = 64) -> tuple[dict[str, float], list[PromptResult]]:
    """Class and context accuracy of the oracle on samples for every (class, context) prompt."""
    cells = [(c, x) for c in CLASSES for x in CONTEXTS]
    prompts = [eval_prompt(c, x) for c, x in cells for _ in range(per_prompt)]
    images = sample_prompts(pipe, prompts, seed, steps, guidance, batch_size)
    labels = oracle.classify(images)
    results = []
    for k, (c, x) in enumerate(cells):
        chunk = labels[k * per_prompt:(k + 1) * per_prompt]
        results.append(PromptResult(c, x, images[k * per_prompt:(k + 1) * per_prompt],
                                    sum(lb.class_name == c for lb in chunk), sum(lb.context == x for lb in chunk)))
    n = len(prompts)
    metrics = {
        "class_accuracy": sum(r.class_hits for r in results) / n,
        "context_accuracy": sum(r.context_hits for r in results) / n,
        "images": float(n), "steps": float(steps), "guidance": guidance,
    }
    for x in CONTEXTS:
        metrics[f"context_accuracy/{x}"] = (sum(r.context_hits for r in results if r.context == x)
                                            / (per_prompt * len(CLASSES)))
    for c in CLASSES:
        metrics[f"class_accuracy/{c}"] = (sum(r.class_hits for r in results if r.class_name == c)
                                          / (per_prompt * len(CONTEXTS)))
    return metrics, results


def grid(results: list[PromptResult], per_cell: int = 1, scale: int = 1) -> Image.Image:
    """Rows: classes (x per_cell), columns: contexts; each cell the first images of that prompt."""
    rows = len(CLASSES) * per_cell
    canvas = Image.new("RGB", (64 * len(CONTEXTS), 64 * rows), "white")
    for r in results:
        row0 = CLASSES.index(r.class_name) * per_cell
        col = CONTEXTS.index(r.context)
        for j, image in enumerate(r.images[:per_cell]):
            canvas.paste(image.resize((64, 64)), (64 * col, 64 * (row0 + j)))
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    return canvas
