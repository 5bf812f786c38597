"""Checkpoint choice: scoring in-memory components, the explained choice, the Pillow plot."""
from __future__ import annotations

import pytest
from PIL import Image

from dreambooth.evaluation import EvaluationResult, PromptScores, plot_scores, select_and_explain
from dreambooth.evaluation.plot import SERIES
from dreambooth.training.scoring import ScoringSamples, checkpoint_prompts, score_checkpoint


def row(step, fidelity, prompt_fidelity, drift):
    return {"step": step, "fidelity": fidelity, "prompt_fidelity": prompt_fidelity, "drift": drift}


ROWS = [row(100, 0.40, 0.32, 0.20), row(200, 0.55, 0.30, 0.30),
        row(300, 0.65, 0.27, 0.45), row(400, 0.70, 0.22, 0.60)]


def test_select_and_explain_prefers_fidelity_within_limits_and_compares_with_last():
    step, reason = select_and_explain(ROWS, min_prompt_fidelity=0.28, max_drift=0.5)
    assert step == 200
    assert "2 of 4" in reason and "last scored step 400" in reason and "0.220" in reason


def test_select_and_explain_when_the_last_step_wins_or_nothing_fits():
    step, reason = select_and_explain(ROWS, min_prompt_fidelity=0.0, max_drift=1.0)
    assert step == 400 and reason.endswith("this is the last scored step")
    step, reason = select_and_explain(ROWS, min_prompt_fidelity=0.5, max_drift=0.1)
    assert step == 100 and reason.startswith("no checkpoint met the limits")


def test_select_and_explain_passes_unmeasured_metrics_through():
    rows = [row(1, 0.3, None, 0.1), row(2, 0.5, None, 0.2)]
    step, reason = select_and_explain(rows, min_prompt_fidelity=0.3, max_drift=0.5)
    assert step == 2 and "not measured" in reason


def colours_in(path) -> set:
    image = Image.open(path).convert("RGB")
    return {c for _, c in image.getcolors(maxcolors=1 << 16)}


def test_plot_scores_draws_every_series_with_axes(tmp_path):
    path = plot_scores(ROWS, tmp_path / "plots" / "scores.png", chosen_step=200,
                       min_prompt_fidelity=0.28, max_drift=0.5)
    assert path.is_file()
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] >= 600
    colours = colours_in(path)
    assert all(colour in colours for _, colour in SERIES.values())
    assert (40, 40, 40) in colours  # axes and labels


def test_plot_scores_handles_gaps_one_row_and_values_outside_0_1(tmp_path):
    rows = [row(10, 1.4, None, -0.2), row(20, 1.1, None, None)]
    assert plot_scores(rows, tmp_path / "a.png").is_file()
    assert plot_scores(rows[:1], tmp_path / "b.png").is_file()
    with pytest.raises(ValueError):
        plot_scores([], tmp_path / "c.png")


def test_checkpoint_prompts():
    assert checkpoint_prompts("sks", "dog", toy=True)[1] == "a photo of sks dog on the moon"
    assert not any("plain" in p or p.endswith("sks dog") for p in checkpoint_prompts("sks", "dog", toy=True))
    assert checkpoint_prompts("sks", "clock", count=2) == ["a sks clock in the jungle",
                                                           "a sks clock in the snow"]


class RecordingScorer:
    """Returns fixed scores and keeps what it was asked to score."""

    def __init__(self):
        self.calls = []

    def score(self, generated, class_images=()):
        self.calls.append((generated, class_images))
        rows = [PromptScores(p, p, len(ims), {"dino": 0.5}) for p, ims in generated.items()]
        return EvaluationResult({"dino": 0.5, "clip_t": 0.3, "pres": 0.2}, rows,
                                {"generated": 0}, {"subject": "fake"})


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-xl"])
def test_score_checkpoint_samples_in_memory_components(subject_dir, model):
    from dreambooth.config import load_config
    from dreambooth.models import load_components

    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}}, [f"model.name={model}"])
    components = load_components(config.model.name)
    components.unet.train()
    for text_encoder in components.text_encoders:
        text_encoder.train()
    scorer = RecordingScorer()
    samples = ScoringSamples(["a {identifier} {class} on the beach", "a red sks dog"], num_per_prompt=2, seed=3)
    result = score_checkpoint(components, config, 40, scorer, samples)
    generated, class_images = scorer.calls[0]
    assert list(generated) == ["a sks dog on the beach", "a red sks dog"]
    assert all(len(ims) == 2 and ims[0].size == (64, 64) for ims in generated.values())
    assert len(class_images) == 2
    assert result["step"] == 40 and result["fidelity"] == 0.5
    assert result["prompt_fidelity"] == 0.3 and result["drift"] == 0.2 and result["seconds"] >= 0
    assert components.unet.training and all(t.training for t in components.text_encoders)  # modes restored
    more = ScoringSamples(["a {identifier} {class}"], num_per_prompt=1, seed=3, num_class_images=5)
    score_checkpoint(components, config, 40, scorer, more)
    generated, class_images = scorer.calls[1]
    assert [len(ims) for ims in generated.values()] == [1] and len(class_images) == 5  # drift from 5, not 1


def test_fidelity_ties_go_to_the_better_prompt_fidelity():
    from dreambooth.evaluation.selection import select_checkpoint

    rows = [{"step": 750, "fidelity": 0.9375, "prompt_fidelity": 0.75, "drift": 0.0},
            {"step": 900, "fidelity": 0.9375, "prompt_fidelity": 0.875, "drift": 0.0}]
    step, _ = select_checkpoint(rows, min_prompt_fidelity=0.75, max_drift=0.1)
    assert step == 900
