"""Checkpoint scoring during training (`--eval-every N`) and the choice of the final one (`--select best`).

The scores come from dreambooth.evaluation's scorers (toy oracle, DINO/CLIP, or the labelled
stand-in); this module decides when to score, samples a small prompt set from the in-memory
model with the same seeds at every scored step (so rows compare), keeps a snapshot of the weights
of each scored step while `select=best`, and at the end loads the chosen snapshot back so final/
holds it.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from dreambooth.atomic import replace_file
from dreambooth.config import RunConfig
from dreambooth.evaluation.plot import plot_scores
from dreambooth.evaluation.scorers import (
    FeatureScorer,
    OracleScorer,
    Scorer,
    load_extractors,
    load_real_images,
    load_toy_oracle,
    sample_by_prompt,
    toy_prompts,
)
from dreambooth.evaluation.selection import select_and_explain, selection_scores
from dreambooth.prompts import class_prompt, fill_prompt, prompts_for
from dreambooth.rundir import RunDir
from dreambooth.sampling import eval_mode, make_pipeline
from dreambooth.training.checkpoints import module_part, trainable_state

# Prompts for checkpoint scoring: a few contexts, so that scoring every N steps stays cheap.
TOY_CHECKPOINT_CONTEXTS = ("beach", "moon", "snow", "underwater")  # new contexts only: "plain" is free
CHECKPOINT_PROMPT_COUNT = 4


class CheckpointScoring:
    """Scores the model every `eval.every` steps, logs the rows, and picks the final weights."""

    def __init__(self, components, config: RunConfig, run: RunDir):
        ev = config.eval
        oracle = ev.scorer == "oracle"
        self.scorer = build_checkpoint_scorer(config, oracle=oracle, subject=ev.subject or None,
                                              dino=ev.dino or None, clip=ev.clip or None,
                                              standin=ev.scorer == "standin")
        self.prompts = checkpoint_prompts(config.data.identifier, config.data.class_noun, toy=oracle,
                                          count=ev.num_prompts)
        self.components, self.config, self.run = components, config, run
        self.snapshots = run.checkpoints / "scored"
        self.rows = [r["eval"] for r in run.read_log() if "eval" in r]  # earlier rows, when resumed

    def due(self, step: int) -> bool:
        return step % self.config.eval.every == 0 or step == self.config.train.steps

    def score(self, step: int, modules: dict) -> dict:
        ev = self.config.eval
        samples = ScoringSamples(self.prompts, ev.num_per_prompt, self.config.train.seed,
                                 num_class_images=ev.num_class_images)
        row = score_checkpoint(self.components, self.config, step, self.scorer, samples)
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        self.run.append_log({"step": step, "eval": row})
        if self.config.eval.select == "best":
            self.snapshots.mkdir(parents=True, exist_ok=True)
            replace_file(self.snapshots / f"step-{step:05d}.safetensors",
                         lambda tmp: save_file(trainable_state(modules), tmp))
        return row

    def finish(self, modules: dict) -> tuple[int, str] | None:
        """Choose (select=best) and load the chosen weights; write the score plot. None if unscored."""
        if not self.rows:
            return None
        ev = self.config.eval
        step, reason = select_and_explain(self.rows, min_prompt_fidelity=ev.min_prompt_fidelity,
                                          max_drift=ev.max_drift)
        if ev.select == "last":
            step = self.config.train.steps
            reason = "select=last: the final step is kept; with select=best the choice would be: " + reason
        elif step != self.config.train.steps:
            load_snapshot(self.snapshots / f"step-{step:05d}.safetensors", modules)
        plot_scores(self.rows, self.run.root / "scores.png", chosen_step=step,
                    min_prompt_fidelity=ev.min_prompt_fidelity, max_drift=ev.max_drift)
        return step, reason

    def cleanup(self) -> None:
        shutil.rmtree(self.snapshots, ignore_errors=True)


def load_snapshot(path: Path, modules: dict) -> None:
    state = load_file(path)
    for prefix, module in modules.items():
        module.load_state_dict(module_part(state, prefix), strict=False)


def checkpoint_prompts(identifier: str, class_noun: str, *, toy: bool = False,
                       count: int = CHECKPOINT_PROMPT_COUNT) -> list[str]:
    """A small prompt set for scoring checkpoints: toy contexts, or the first of the paper's prompts."""
    if toy:
        return list(toy_prompts(identifier, class_noun, TOY_CHECKPOINT_CONTEXTS[:count]))
    return prompts_for(identifier, class_noun)[:count]


def build_checkpoint_scorer(config: RunConfig, *, oracle: bool = False, subject: str | None = None,
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


@dataclass(frozen=True)
class ScoringSamples:
    """What `score_checkpoint` generates: `prompts` (with `{identifier}`/`{class}`) and the plain class
    prompt, `num_per_prompt` images each from seeds seed.. (`num_class_images` of the class prompt,
    0: as many), `steps` sampler steps (None: the run's output.sample_steps). The seeds are the same
    at every step, so rows compare."""

    prompts: Sequence[str]
    num_per_prompt: int = 2
    seed: int = 0
    steps: int | None = None
    guidance: float = 7.5
    sampler: str = "dpmpp"
    num_class_images: int = 0


@torch.no_grad()
def score_checkpoint(components, config: RunConfig, step: int, scorer: Scorer, samples: ScoringSamples) -> dict:
    """Generate the samples from the in-memory model and score them.

    Returns one JSON-ready row: step, fidelity, prompt_fidelity, drift (the keys
    `select_and_explain` uses), every overall metric of the scorer, and seconds taken.
    """
    began = time.perf_counter()
    data = config.data
    filled = [fill_prompt(p, data.identifier, data.class_noun) for p in samples.prompts]
    plain = class_prompt(data.class_noun)
    common = dict(num_per_prompt=samples.num_per_prompt, seed=samples.seed, guidance=samples.guidance,
                  steps=samples.steps or config.output.sample_steps, resolution=data.resolution)
    pipe = make_pipeline(components, samples.sampler)
    with eval_mode(components.unet, *components.text_encoders):
        generated = sample_by_prompt(pipe, filled, **common)
        class_images = sample_by_prompt(pipe, [plain], **{
            **common, "num_per_prompt": samples.num_class_images or samples.num_per_prompt})[plain]
    result = scorer.score(generated, class_images)
    return {**result.overall, **selection_scores(result, step),
            "seconds": round(time.perf_counter() - began, 3)}
