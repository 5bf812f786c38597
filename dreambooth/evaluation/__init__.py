"""Evaluation with the DreamBooth paper's metrics (Ruiz et al., CVPR 2023, sec. 4.1).

Modules: `results` (result types, metric names, aggregation), `scorers` (DINO/CLIP/stand-in
feature scoring and the toy-world oracle behind one `Scorer.score(generated, class_images)`),
`selection` (choosing and explaining a checkpoint), plus `features`, `metrics`, `report` and
`plot`. The `evaluate` command's orchestration is `dreambooth.evaluation.command`, imported only
by the command line; checkpoint scoring during training is `dreambooth.training.scoring`.

Typical use (prompts from `dreambooth.prompts.prompts_for`):

    subject = load_dino(folder)          # or load_standin() offline
    clip = load_clip(folder)
    result = score_images({p: images_for(p) for p in prompts_for("sks", "dog")}, real,
                          class_images, subject_extractor=subject, clip=clip,
                          identifier="sks", class_noun="dog")
    write_report(out_dir, result, {p: make_grid(ims, 4) for p, ims in ...})
    step, why = select_checkpoint([selection_scores(r, s) for s, r in results],
                                  min_prompt_fidelity=0.28, max_drift=0.6)

Toy world: `OracleScorer`. Feature models are imported only when a loader is called.
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
from dreambooth.evaluation.plot import plot_scores
from dreambooth.evaluation.report import make_grid, write_report
from dreambooth.evaluation.results import EvaluationResult, PromptScores
from dreambooth.evaluation.scorers import (
    Extractors,
    FeatureScorer,
    OracleScorer,
    Scorer,
    load_extractors,
    load_toy_oracle,
    score_images,
    score_prompt,
    toy_prompts,
)
from dreambooth.evaluation.selection import select_and_explain, select_checkpoint, selection_scores

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_DINO", "STANDIN_NAME", "FeatureExtractor", "TextImageExtractor",
    "load_clip", "load_dino", "load_standin", "METRIC_DEFINITIONS", "mean_pairwise_cosine",
    "mean_self_similarity", "within_set_diversity", "make_grid", "write_report",
    "EvaluationResult", "PromptScores", "score_images", "score_prompt", "selection_scores",
    "select_checkpoint", "select_and_explain", "OracleScorer", "load_toy_oracle", "toy_prompts",
    "Extractors", "FeatureScorer", "Scorer", "load_extractors", "plot_scores",
]
