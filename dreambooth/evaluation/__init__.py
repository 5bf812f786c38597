"""Evaluation with the DreamBooth paper's metrics (Ruiz et al., CVPR 2023, sec. 4.1).

Typical use:

    subject = load_dino(folder)          # or load_standin() offline
    clip = load_clip(folder)
    result = score_images({p: images_for(p) for p in prompts_for("sks", "dog")}, real,
                          class_images, subject_extractor=subject, clip=clip,
                          identifier="sks", class_noun="dog")
    write_report(out_dir, result, {p: make_grid(ims, 4) for p, ims in ...})
    step, why = select_checkpoint([selection_scores(r, s) for s, r in results],
                                  min_prompt_fidelity=0.28, max_drift=0.6)

Whole runs: `evaluate_run(run_dir, photos, "sks", "dog", out)` (the `evaluate` command). Toy
world: `OracleScorer`. During training: `score_checkpoint` every N steps, then
`select_and_explain` and `plot_scores`. Feature models are imported only when a loader is called.
"""
from dreambooth.evaluation.features import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    STANDIN_NAME,
    FeatureExtractor,
    TextImageExtractor,
    load_clip,
    load_dino,
    load_standin,
)
from dreambooth.evaluation.metrics import (
    METRIC_DEFINITIONS,
    mean_pairwise_cosine,
    mean_self_similarity,
    within_set_diversity,
)
from dreambooth.prompts import (
    LIVE_SUBJECT_PROMPTS,
    OBJECT_PROMPTS,
    class_prompt,
    class_prompt_for,
    prompts_for,
    read_prompt_file,
)
from dreambooth.evaluation.report import make_grid, write_report
from dreambooth.evaluation.scoring import (
    EvaluationResult,
    PromptScores,
    score_images,
    score_prompt,
    selection_scores,
)
from dreambooth.evaluation.selection import select_checkpoint
from dreambooth.evaluation.oracle_scoring import OracleScorer, load_toy_oracle, toy_prompts
from dreambooth.evaluation.scorers import Extractors, FeatureScorer, Scorer, load_extractors
from dreambooth.evaluation.run import evaluate_run
from dreambooth.evaluation.checkpoint_choice import (
    build_checkpoint_scorer,
    checkpoint_prompts,
    score_checkpoint,
    select_and_explain,
)
from dreambooth.evaluation.plot import plot_scores

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_DINO", "STANDIN_NAME", "FeatureExtractor", "TextImageExtractor",
    "load_clip", "load_dino", "load_standin", "METRIC_DEFINITIONS", "mean_pairwise_cosine",
    "mean_self_similarity", "within_set_diversity", "LIVE_SUBJECT_PROMPTS", "OBJECT_PROMPTS",
    "class_prompt", "class_prompt_for", "prompts_for", "read_prompt_file", "make_grid",
    "write_report", "EvaluationResult", "PromptScores", "score_images", "score_prompt",
    "selection_scores", "select_checkpoint", "OracleScorer", "load_toy_oracle", "toy_prompts",
    "Extractors", "FeatureScorer", "Scorer", "load_extractors", "evaluate_run",
    "build_checkpoint_scorer", "checkpoint_prompts", "score_checkpoint", "select_and_explain",
    "plot_scores",
]
