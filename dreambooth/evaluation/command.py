"""`dreambooth evaluate`: generate the paper's evaluation images from a run and score them.

This is the command's orchestration (load photos and prompts, build a scorer, sample, write
metrics.json, grids/ and report.html). Only the command line imports it; library code uses the
scorers, results and selection modules directly.

Protocol (Ruiz et al., CVPR 2023, sec. 4.1): the subject's 25 prompts (or the user's), N images
per prompt with fixed seeds (the same seeds for every prompt, so prompts compare), plus images of
the plain class prompt ("a dog") for PRES.

Order of work: check the photos, read the prompts and load the scorer's models first, so a bad
input or a missing DINO fails in seconds, before the diffusion model is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from dreambooth.evaluation.report import make_grid, write_report
from dreambooth.evaluation.results import EvaluationResult
from dreambooth.evaluation.scorers import (
    Extractors,
    FeatureScorer,
    OracleScorer,
    Scorer,
    context_of,
    load_extractors,
    load_real_images,
    sample_by_prompt,
    toy_prompts,
)
from dreambooth.generate import GenerationSettings, load_for_generation, make_generation_pipeline
from dreambooth.prompts import class_prompt, fill_prompt, prompts_for, read_prompt_file

PromptSource = str | Path | Sequence[str] | None  # a prompt file, a list of prompts, or the default


def resolve_prompts(prompts: PromptSource, identifier: str, class_noun: str, *,
                    toy: bool = False) -> dict[str, str | None]:
    """prompt -> intended toy context (None outside the toy world or when the prompt names none).

    Default: the paper's 25 prompts chosen by class noun, or one prompt per toy context for toy
    runs. A str or Path is a prompt file (`{identifier}` and `{class}` placeholders); a list is
    taken as is, with the same placeholders filled.
    """
    if prompts is None:
        if toy:
            return dict(toy_prompts(identifier, class_noun))
        chosen = prompts_for(identifier, class_noun)
    elif isinstance(prompts, (str, Path)):
        chosen = read_prompt_file(prompts, identifier, class_noun)
    else:
        chosen = [fill_prompt(p, identifier, class_noun) for p in prompts]
    return {p: context_of(p) if toy else None for p in chosen}


def evaluate_run(
    model: str | Path,
    images_dir: str | Path,
    identifier: str,
    class_noun: str,
    output: str | Path,
    *,
    prompts: PromptSource = None,
    num_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 25,
    extractors: Extractors | Callable[[], Extractors] | None = None,
    oracle=None,
    subject: str | None = None,
    num_class_images: int | None = None,
    settings: GenerationSettings = GenerationSettings(),
    device=None,
) -> EvaluationResult:
    """Generate and score a run (or any MODEL); write metrics.json, grids/ and report.html.

    extractors: DINO/CLIP (default: `load_extractors()`, which fails offline without the
    models). oracle: a toy-world `Oracle`; when given, the oracle scores instead of DINO/CLIP and
    `subject` names the toy subject (default: the class noun). Either may be a zero-argument
    loader, called only after the photos and prompts passed their checks. num_class_images: plain
    class-prompt images for PRES / language drift (default: num_per_prompt).
    """
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    real = load_real_images(images_dir)
    by_prompt = resolve_prompts(prompts, identifier, class_noun, toy=oracle is not None)
    scorer: Scorer
    if oracle is not None:
        scorer = OracleScorer(_loaded(oracle), subject or class_noun, real=real, contexts=by_prompt)
    else:
        scorer = FeatureScorer(_loaded(extractors or load_extractors), real,
                               identifier=identifier, class_noun=class_noun)
    settings = replace(settings, steps=steps)
    generated, class_images, record = _generate(model, list(by_prompt), class_prompt(class_noun),
                                                num_per_prompt, num_class_images or num_per_prompt,
                                                seed, settings, device)
    result = scorer.score(generated, class_images)
    notes = result.notes + _run_mismatch_notes(record.pop("run_info"), identifier, class_noun)
    result = replace(result, notes=notes, settings=record)
    grids = {p: make_grid(ims, num_per_prompt) for p, ims in generated.items()}
    grids[class_prompt(class_noun)] = make_grid(class_images, num_per_prompt)
    write_report(output, result, grids, title=f"DreamBooth evaluation: {identifier} {class_noun}")
    return result


def _loaded(thing):
    """`thing`, or what it returns when it is a loader (Extractors and Oracle are not callable)."""
    return thing() if callable(thing) else thing


def _generate(model, prompts: list[str], plain: str, num: int, num_class: int, seed: int,
              settings: GenerationSettings, device) -> tuple[dict, list[Image.Image], dict]:
    """Images of the prompts and of the plain class prompt, and a record of how they were made."""
    loaded = load_for_generation(model, device=device)
    resolution = settings.resolution or (loaded.info or {}).get("resolution") or loaded.components.resolution
    pipe = make_generation_pipeline(loaded, settings)
    common = dict(seed=seed, steps=settings.steps, guidance=settings.guidance, resolution=resolution,
                  negative_prompt=settings.negative_prompt)
    generated = sample_by_prompt(pipe, prompts, num_per_prompt=num, **common)
    class_images = sample_by_prompt(pipe, [plain], num_per_prompt=num_class, **common)[plain]
    record = dict(asdict(settings), model=str(model), resolution=resolution, seed=seed,
                  num_per_prompt=num, class_prompt=plain, run_info=loaded.info)
    return generated, class_images, record


def _run_mismatch_notes(info: dict | None, identifier: str, class_noun: str) -> list[str]:
    """A warning when the identifier or class noun differ from what the run was trained with."""
    if not info:
        return []
    trained = (info.get("identifier"), info.get("class_noun"))
    if trained == (identifier, class_noun):
        return []
    return [f"warning: the run was trained with identifier {trained[0]!r} and class noun "
            f"{trained[1]!r}, but evaluated with {identifier!r} and {class_noun!r}."]
