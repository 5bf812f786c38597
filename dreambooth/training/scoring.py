"""Checkpoint scoring during training (`--eval-every N`) and the choice of the final one (`--select best`).

The scores come from dreambooth.evaluation (toy oracle, DINO/CLIP, or the labelled stand-in); this
module only decides when to score, keeps a snapshot of the weights of each scored step while
`select=best`, and at the end loads the chosen snapshot back so final/ holds it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from dreambooth.config import RunConfig
from dreambooth.rundir import RunDir
from dreambooth.training.checkpoints import module_part, trainable_state


class CheckpointScoring:
    def __init__(self, components, config: RunConfig, run: RunDir):
        from dreambooth.evaluation import build_checkpoint_scorer, checkpoint_prompts

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
        from dreambooth.evaluation import score_checkpoint

        row = score_checkpoint(self.components, self.config, step, scorer=self.scorer, prompts=self.prompts,
                               num_per_prompt=self.config.eval.num_per_prompt, seed=self.config.train.seed)
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        self.run.append_log({"step": step, "eval": row})
        if self.config.eval.select == "best":
            self.snapshots.mkdir(parents=True, exist_ok=True)
            tmp = self.snapshots / f".step-{step:05d}.tmp"
            save_file(trainable_state(modules), tmp)
            tmp.replace(self.snapshots / f"step-{step:05d}.safetensors")
        return row

    def finish(self, modules: dict) -> tuple[int, str] | None:
        """Choose (select=best) and load the chosen weights; write the score plot. None if unscored."""
        from dreambooth.evaluation import plot_scores, select_and_explain

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
