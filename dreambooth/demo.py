"""`dreambooth demo`: DreamBooth end to end on the toy world, on a CPU, with figures.

Five rendered photos of a toy subject -> class images from the base model -> fine-tune with prior
preservation -> the subject in new contexts. The gallery shows the photos, the class images, and
before/after images for the same prompts and seeds; the toy oracle and identity embedding turn "did it work?" into
numbers (subject fidelity, prompt fidelity, language drift).
"""
from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.atomic import write_json, write_text
from dreambooth.config import load_config
from dreambooth.errors import ConfigError, ModelSourceError, Problem, RunDirError
from dreambooth.evaluation import OracleScorer, load_toy_oracle
from dreambooth.generate import GenerationSettings, load_for_generation, make_generation_pipeline
from dreambooth.models import detect_source, model_folder
from dreambooth.models.builtin import TOY_WEIGHTS
from dreambooth.priors import cached_class_images, class_image_key
from dreambooth.prompts import fill_prompt
from dreambooth.rundir import RunDir
from dreambooth.sampling import make_grid, sample_per_prompt
from dreambooth.toyworld.identities import describe_look, named_identity, random_fresh_name
from dreambooth.toyworld.render import SUBJECTS, context_phrase, object_mask
from dreambooth.toyworld.render import render as render_spec
from dreambooth.training import train_events

MARKER = "demo.json"
PHOTO_CONTEXTS = ("plain", "table", "city", "plain", "city")  # varied, as real photos are; none of NEW_CONTEXTS
NEW_CONTEXTS = ("beach", "moon", "snow", "jungle", "underwater", "red_carpet")
SEEDS = (0, 1, 2, 3)
GUIDANCE = 7.5  # the same scale as checkpoint scoring (training.scoring.score_checkpoint), so figures compare
# The demo scores checkpoints with the oracle and keeps the best; the `toy` preset itself
# leaves this off, since the oracle only knows the toy world's subjects.
DEMO_EVAL = ["eval.every=200", "eval.scorer=oracle", "eval.num_per_prompt=4", "eval.num_class_images=16",
             "eval.select=best", "eval.min_prompt_fidelity=0.75", "eval.max_drift=0.1"]
# The rendered photos come with masks, so the demo down-weights their backgrounds: learning the
# studio backgrounds is what cost prompt fidelity (benchmarks/RESULTS-toy.md, held-out ablations).
DEMO_MASKS = ["data.masks=files", "train.mask_background_weight=0.1"]


def prepare_output(output: Path) -> None:
    """The demo may replace its own earlier output, never anything else."""
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).exists():
            raise RunDirError(f"{output} is not empty and is not a demo output",
                              [Problem(str(output), "choose another --output; nothing was changed")])
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def resolve_subject(subject: str | None, rng: np.random.Generator | None = None) -> str:
    """The demo's subject: a built-in name ("dog"), "id:<seed>", or None for an identity drawn at
    random from the held-out pool (seeds no training or tuning used). Unknown names are refused."""
    name = subject or random_fresh_name(rng or np.random.default_rng())
    try:
        known = named_identity(name)
    except ValueError as e:
        known, why = None, str(e)
    else:
        why = f"use a built-in subject ({', '.join(SUBJECTS)}) or id:<seed>, e.g. id:2000003"
    if known is None:
        raise ConfigError("Unknown demo subject", [Problem(name, why)])
    return name


def subject_class(subject: str) -> str:
    return named_identity(subject).class_name


def write_subject_photos(folder: Path, subject: str) -> list[Path]:
    """Five photos of the subject in varied contexts, each with its mask (`<stem>.mask.png`, white
    on the subject) for `data.masks=files`. Built-in subjects render as they always have."""
    folder.mkdir(parents=True, exist_ok=True)
    ident = named_identity(subject)
    paths = []
    for i, context in enumerate(PHOTO_CONTEXTS):
        if subject in SUBJECTS:
            rng = np.random.default_rng(100 + i)
            spec = SUBJECTS[subject](rng, context)
        else:
            rng = np.random.default_rng([ident.key, 100 + i])
            spec = ident.spec(rng, context)
        path = folder / f"{subject.replace(':', '-')}-{i}.png"
        render_spec(spec, rng).save(path)
        object_mask(spec).save(path.with_name(path.stem + ".mask.png"))
        paths.append(path)
    return paths


def toy_available() -> bool:
    return (TOY_WEIGHTS / "model_index.json").exists()


def demo_config(photos: Path, model: str, subject: str, steps: int | None, extra: list[str]):
    preset = "toy" if model == "toy" else "tiny"
    overrides = {"data": {"images": str(photos), "identifier": "sks",
                          "class_noun": subject_class(subject)}, "model": {"name": model}}
    if steps:
        overrides["train"] = {"steps": steps}
    return load_config(preset, overrides, extra)


def run_demo(output: str | Path, *, model: str | None = None, steps: int | None = None, subject: str | None = "dog",
             render=None, extra: list[str] = (), prior: bool = True) -> dict:
    """Train, render before/after, score with the oracle, write gallery.png/index.html/figures.json.

    `subject`: a built-in name, "id:<seed>", or None for a held-out identity picked at random."""
    began = time.perf_counter()
    subject = resolve_subject(subject)
    out = Path(output)
    prepare_output(out)
    write_json(out / MARKER, {"status": "running"}, indent=None)
    model = model or ("toy" if toy_available() else "tiny-random")
    photos = write_subject_photos(out / "photos", subject)
    figures_subject = {"subject": subject, "subject_look": describe_look(named_identity(subject))}
    evaluation = DEMO_EVAL + DEMO_MASKS + [f"eval.subject={subject}"] if model == "toy" else []
    extra = evaluation + list(extra) + ([] if prior else ["prior.enabled=false"])
    config = demo_config(out / "photos", model, subject, steps, extra)
    events = train_events(config, out / "run")
    last = render(events) if render else _drain(events)
    info = RunDir(out / "run").run_info()
    figures = {"model": model, **figures_subject, "prior_preservation": prior, "steps": config.train.steps,
               "selected_step": info.get("selected_step", config.train.steps),
               "selection_reason": info.get("selection_reason", ""),
               "train_seconds": round(getattr(last, "seconds", 0.0), 1)}
    figures.update(before_after(out, config, model, subject, photos))
    figures["total_seconds"] = round(time.perf_counter() - began, 1)
    write_json(out / "figures.json", figures, indent=2)
    write_html(out, figures)
    write_json(out / MARKER, {"status": "done", **figures}, indent=None)
    return figures


def _drain(events):
    last = None
    for last in events:
        pass
    return last


def before_after(out: Path, config, model: str, subject: str, photos: list[Path]) -> dict:
    """Images of the same prompts and seeds from the base model and the trained one, and scores."""
    d = config.data
    prompts = [fill_prompt("a photo of {identifier} {class} " + context_phrase(c), d.identifier, d.class_noun)
               for c in NEW_CONTEXTS]
    plain = fill_prompt("a photo of a {class}", d.identifier, d.class_noun)
    settings = GenerationSettings(steps=config.output.sample_steps, guidance=GUIDANCE)
    images = {}
    for name, source in (("before", model), ("after", out / "run")):
        loaded = load_for_generation(str(source))
        pipe = make_generation_pipeline(loaded, settings)
        every = prompts + [plain]
        rows = sample_per_prompt(pipe, every, list(SEEDS), steps=settings.steps, guidance=settings.guidance,
                                 resolution=config.data.resolution)
        images[name] = dict(zip(every, rows))
    write_gallery(out, [Image.open(p) for p in photos], _class_images(config), images, prompts, plain)
    save_images(out / "images", images)
    return score(images, prompts, plain, subject, photos)


def save_images(folder: Path, images: dict) -> None:
    """Every before/after image as a PNG (`{before,after}/{prompt index}-{seed}.png`) with the
    prompts in `prompts.json`, so that the figures can be recomputed with another scorer."""
    for name, by_prompt in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(by_prompt.values()):
            for seed, image in zip(SEEDS, row):
                image.save(folder / name / f"{i}-{seed}.png")
    write_json(folder / "prompts.json", list(next(iter(images.values()))), indent=1)


def load_images(folder: Path) -> dict:
    """What `save_images` wrote: {"before"|"after": {prompt: [image per seed]}}."""
    prompts = json.loads((folder / "prompts.json").read_text())
    return {name: {p: [Image.open(folder / name / f"{i}-{seed}.png").convert("RGB") for seed in SEEDS]
                   for i, p in enumerate(prompts)} for name in ("before", "after")}


def rescore(out: Path) -> dict:
    """The figures of a finished demo output recomputed from its saved images with today's scorer."""
    figures = json.loads((out / "figures.json").read_text())
    images = load_images(out / "images")
    prompts = list(images["after"])
    photos = sorted(p for p in (out / "photos").glob("*.png") if not p.name.endswith(".mask.png"))
    return score(images, prompts[:-1], prompts[-1], figures["subject"], photos)


def _class_images(config) -> list:
    if not config.prior.enabled:
        return []
    key = class_image_key(model_folder(detect_source(config.model.name)), config)
    return [Image.open(p) for p in cached_class_images(key, config.prior.cache or None)[:8]]


def score(images: dict, prompts: list[str], plain: str, subject: str, photos: list[Path]) -> dict:
    """Oracle figures before and after training (toy world only; None elsewhere)."""
    try:
        scorer = OracleScorer(load_toy_oracle(), subject, real=[Image.open(p) for p in photos])
    except ModelSourceError as e:  # the oracle ships with the toy world; say so when it is missing
        return {"oracle": f"not available: {e.summary}"}
    out = {}
    for name, by_prompt in images.items():
        result = scorer.score({p: by_prompt[p] for p in prompts}, by_prompt[plain])
        out[name] = {k: v for k, v in result.overall.items() if isinstance(v, (int, float)) or v is None}
    return out


def write_gallery(out: Path, photos: list, class_images: list, images: dict, prompts: list[str], plain: str) -> None:
    """gallery.png: photos, class images, then per prompt a row of before | after."""
    rows = [make_grid(photos, cols=len(photos))]
    if class_images:
        rows.append(make_grid(class_images, cols=len(class_images)))
    for prompt in prompts + [plain]:
        rows.append(make_grid(images["before"][prompt] + images["after"][prompt], cols=2 * len(SEEDS)))
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(out / "gallery.png")


def write_html(out: Path, figures: dict) -> None:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in figures.items())
    write_text(out / "index.html",
        "<!doctype html><meta charset=utf-8><title>dreambooth demo</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}img{image-rendering:pixelated;"
        "width:100%}td,th{text-align:left;padding:.2em .6em;border-bottom:1px solid #ddd}</style>"
        "<h1>DreamBooth on the toy world</h1><p>Rows: the subject photos; class images from the base model; "
        "then for each prompt four images before training (left) and after (right), same seeds.</p>"
        f"<img src=gallery.png alt=gallery><h2>Figures</h2><table>{rows}</table>"
        + ("<h2>Checkpoint scores</h2><img src=run/scores.png alt=scores style='width:auto'>"
           if (out / "run" / "scores.png").exists() else ""))
