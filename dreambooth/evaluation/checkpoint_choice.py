"""Score checkpoints during training and choose one, instead of picking by eye.

The training loop calls `score_checkpoint` every N steps on its in-memory components, collects
the rows, and at the end calls `select_and_explain` (and `plot_scores` for the picture). The
trade-off (Ruiz et al., CVPR 2023, sec. 4.3-4.4): longer training raises subject fidelity but
lowers prompt fidelity (the subject's photos override the context) and raises language drift
(the class prompt turns into the subject). We maximise subject fidelity subject to prompt
fidelity >= a floor and drift <= a ceiling.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from dreambooth.prompts import fill_prompt
from dreambooth.evaluation.oracle_scoring import OracleScorer, load_toy_oracle, toy_prompts
from dreambooth.prompts import class_prompt, prompts_for
from dreambooth.evaluation.run import load_real_images, sample_by_prompt
from dreambooth.evaluation.scorers import FeatureScorer, Scorer, load_extractors
from dreambooth.evaluation.scoring import selection_scores
from dreambooth.evaluation.selection import select_checkpoint

Row = Mapping[str, float | int | None]

# Prompts for checkpoint scoring: a few contexts, so that scoring every N steps stays cheap.
TOY_CHECKPOINT_CONTEXTS = ("beach", "moon", "snow", "underwater")  # new contexts only: "plain" is free
CHECKPOINT_PROMPT_COUNT = 4


def checkpoint_prompts(identifier: str, class_noun: str, *, toy: bool = False,
                       count: int = CHECKPOINT_PROMPT_COUNT) -> list[str]:
    """A small prompt set for scoring checkpoints: toy contexts, or the first benchmark prompts."""
    if toy:
        return list(toy_prompts(identifier, class_noun, TOY_CHECKPOINT_CONTEXTS[:count]))
    return prompts_for(identifier, class_noun)[:count]


def build_checkpoint_scorer(config, *, oracle: bool = False, subject: str | None = None,
                            dino: str | Path | None = None, clip: str | Path | None = None,
                            standin: bool = False) -> Scorer:
    """The scorer for a run: the toy oracle (`subject` defaults to the class noun), or DINO/CLIP
    (or stand-in) against the run's subject photos. Build it once, before training, so a missing
    model fails before the first step."""
    real = load_real_images(config.data.images)
    if oracle:
        return OracleScorer(load_toy_oracle(), subject or config.data.class_noun, real=real)
    return FeatureScorer(load_extractors(dino, clip, standin=standin), real,
                         identifier=config.data.identifier, class_noun=config.data.class_noun)


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put modules in eval mode for sampling and restore each one's mode afterwards."""
    before = [(m, m.training) for m in modules]
    for m, _ in before:
        m.eval()
    try:
        yield
    finally:
        for m, training in before:
            m.train(training)


@torch.no_grad()
def score_checkpoint(components, config, step: int, *, scorer: Scorer, prompts: Sequence[str],
                     num_per_prompt: int = 2, seed: int = 0, steps: int | None = None,
                     guidance: float = 7.5, sampler: str = "dpmpp") -> dict:
    """Generate `prompts` (and the plain class prompt) from the in-memory model and score them.

    Returns one JSON-ready row: step, fidelity, prompt_fidelity, drift (the keys
    `select_and_explain` uses), every overall metric of the scorer, and seconds taken.
    `{identifier}`/`{class}` in prompts are filled from the config; steps defaults to
    config.output.sample_steps. The seeds are the same at every step, so rows compare.
    """
    from dreambooth.sampling import make_pipeline

    began = time.perf_counter()
    data = config.data
    filled = [fill_prompt(p, data.identifier, data.class_noun) for p in prompts]
    plain = class_prompt(data.class_noun)
    common = dict(num_per_prompt=num_per_prompt, seed=seed, guidance=guidance,
                  steps=steps or config.output.sample_steps, resolution=data.resolution)
    pipe = make_pipeline(components, sampler)
    with _eval_mode(components.unet, components.text_encoder):
        generated = sample_by_prompt(pipe, filled, **common)
        class_images = sample_by_prompt(pipe, [plain], **common)[plain]
    result = scorer.score(generated, class_images)
    return {**result.overall, **selection_scores(result, step),
            "seconds": round(time.perf_counter() - began, 3)}


def select_and_explain(rows: Sequence[Row], *, min_prompt_fidelity: float,
                       max_drift: float) -> tuple[int, str]:
    """(step, reason): the checkpoint to keep, and why, in words for the log and the CLI.

    The trade-off: subject fidelity rises with training while prompt fidelity falls and drift
    rises, so the most faithful checkpoint is often one that ignores prompts or has turned every
    "dog" into the subject. We maximise subject fidelity subject to prompt fidelity >=
    min_prompt_fidelity and drift <= max_drift (`selection.select_checkpoint`: ties go to the
    earlier step; when no row meets the limits, the closest one is taken and the reason says so).
    The reason also compares the choice with the last scored step, the one training ends on.
    """
    step, reason = select_checkpoint(rows, min_prompt_fidelity=min_prompt_fidelity,
                                     max_drift=max_drift)
    last = max(rows, key=lambda r: r["step"])
    if last["step"] == step:
        return step, f"{reason}; this is the last scored step"
    chosen = next(r for r in rows if r["step"] == step)
    return step, (f"{reason}; the last scored step {last['step']} has subject fidelity "
                  f"{_fmt(last['fidelity'])}, prompt fidelity {_fmt(last['prompt_fidelity'])}, "
                  f"drift {_fmt(last['drift'])} (chosen: {_fmt(chosen['prompt_fidelity'])} "
                  f"prompt fidelity, {_fmt(chosen['drift'])} drift)")


def _fmt(value: float | int | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"
