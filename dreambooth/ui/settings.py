"""What the form asks for, and the checks the page shows before anything trains.

The page offers three presets by purpose (fast LoRA, full quality, memory-lean); which YAML preset
that means depends on the base model: the tiny smoke-test models and the toy model have their own
small presets, an SDXL model (told by its family, without loading weights) the 1024 px SDXL ones.
Everything is turned into a `RunConfig` with the library's `load_config`, so the web app and the
CLI validate the same way and report every problem at once.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from dreambooth.config import load_config
from dreambooth.config_files import list_presets
from dreambooth.data.images import check_images
from dreambooth.errors import ConfigError, DreamboothError, Problem
from dreambooth.identifier import check_identifier, suggest_identifiers
from dreambooth.model_family import model_family
from dreambooth.models import detect_source, hub_offline
from dreambooth.models.builtin import TOKENIZER_DIR, TOY_WEIGHTS

# purpose -> {kind of base model: preset}; "sd" is every model not named here (SD 1.x/2.x, unknown)
PRESETS = {
    "fast-lora": {"tiny-random": "tiny-lora", "toy": "toy-lora", "tiny-xl": "tiny-xl-lora", "sdxl": "sdxl-lora",
                  "sd": "sd15-lora"},
    "full": {"tiny-random": "tiny", "toy": "toy", "tiny-xl": "tiny-xl", "sdxl": "sdxl-full-24gb", "sd": "sd15-full"},
    "lean": {"tiny-random": "tiny", "toy": "toy", "tiny-xl": "tiny-xl", "sdxl": "sdxl-lora-8gb", "sd": "sd15-lean"},
}
PRESET_LABELS = {"fast-lora": "Fast LoRA", "full": "Full quality", "lean": "Memory-lean"}
# What each purpose's card says under its label, by kind of base model (the page's default is "sd")
PRESET_ABOUT = {
    "sd": {"fast-lora": "small adapter file, quickest, ~6 GB GPU",
           "full": "fine-tunes the whole UNet, the paper's recipe",
           "lean": "full fine-tune that fits 8–16 GB GPUs"},
    "sdxl": {"fast-lora": "SDXL adapter file at 1024 px, fits a 12 GB GPU",
             "full": "fine-tunes the whole SDXL UNet, 24 GB GPU",
             "lean": "SDXL adapter that fits an 8 GB GPU"},
}
TOY_NOTE = ("toy knows only its toy world (six classes such as dog, cat and teapot, drawn in simple "
            "rendered scenes): it learns your subject as it can draw it, so real photos come out as toy-world "
            "renderings. Use a Stable Diffusion model for photo-real results.")


def model_options() -> list[dict]:
    """Built-in models the page lists; `toy` only once its weights are shipped in this install."""
    options = [{"value": "tiny-random", "label": "tiny-random (smoke test: random weights, learns nothing)"},
               {"value": "tiny-random-xl", "label": "tiny-random-xl (SDXL smoke test: random weights, learns nothing)"}]
    if (TOY_WEIGHTS / "model_index.json").exists():
        options.insert(0, {"value": "toy", "label": "toy (built-in toy-world model)"})
    return options


def hub_online() -> bool:
    return not hub_offline()


def model_kind(model: str) -> str:
    """Which column of PRESETS a base model takes: tiny-random and toy by name, SDXL models by
    their family; "sd" for the rest, and for a model that cannot be read (its check says why)."""
    if model in ("tiny-random", "toy"):
        return model
    try:
        family = model_family(model.strip()).family
    except DreamboothError:
        return "sd"
    return family if family in ("sdxl", "tiny-xl") else "sd"


def preset_for(purpose: str, model: str) -> str:
    """The YAML preset for a purpose and base model; falls back to the SD 1.5 one."""
    return _preset_of_kind(purpose, model_kind(model))


def _preset_of_kind(purpose: str, kind: str) -> str:
    if purpose not in PRESETS:
        raise DreamboothError("unknown preset", [Problem("preset", f"{purpose!r}: use {', '.join(PRESETS)}")])
    choices = PRESETS[purpose]
    return choices[kind] if choices[kind] in list_presets() else choices["sd"]


def preset_defaults(purpose: str, model: str) -> dict:
    """The values the advanced section starts from, read from the preset itself, and what the
    purposes' cards say for this model."""
    kind = model_kind(model)  # reads the model's config files: once
    preset = _preset_of_kind(purpose, kind)
    config = load_config(preset, {"data": {"class_noun": "placeholder"}})  # needed by validation
    return {"preset": preset, "steps": config.train.steps, "lr": config.train.lr,
            "prior": config.prior.enabled, "class_images": config.prior.num_images,
            "sample_every": config.output.sample_every, "resolution": config.data.resolution,
            "about": PRESET_ABOUT.get(kind, PRESET_ABOUT["sd"])}


def model_problems(model: str) -> list[Problem]:
    """Check MODEL without loading weights: built-in, local folder or file, or hub id when online."""
    try:
        source = detect_source(model.strip())
    except DreamboothError as err:
        return err.problems or [Problem(model, err.summary)]
    if source.kind == "hub" and not hub_online():
        return [Problem(model, "looks like a hub id, but this machine is offline (HF_HUB_OFFLINE=1); "
                               "use a built-in model or a local folder or .safetensors file")]
    return []


# form key -> (config group, config key, the field's label on the page, number type or None)
FORM_SETTINGS = {
    "steps": ("train", "steps", "Steps", int),
    "lr": ("train", "lr", "Learning rate", float),
    "prior": ("prior", "enabled", "Prior preservation", None),
    "class_images": ("prior", "num_images", "Class images", int),
    "sample_every": ("output", "sample_every", "Samples every N steps", int),
    "resolution": ("data", "resolution", "Resolution", int),
}
FORM_TEXT = ("identifier", "class_noun", "model", "preset")
TEXT_LIMITS = {"identifier": ("Identifier", 32), "class_noun": ("Class noun", 40), "model": ("Base model", 1000)}
# config keys (as the library names them) -> the page's words
USER_WORDS = {f"{group}.{key}": label for group, key, label, _ in FORM_SETTINGS.values()} | {
    "data.identifier": "Identifier", "data.class_noun": "Class noun", "model.name": "Base model",
    "identifier": "Identifier", "preset": "Preset"}


def form_overrides(form: dict) -> tuple[dict, list[Problem]]:
    """The form's values as config overrides, and a problem for each value that is not usable.

    Empty fields take the preset's value; anything else must parse, so a typo is reported, never
    silently replaced by the default.
    """
    problems = [Problem(key, "is not a setting of this app") for key in form
                if key not in FORM_SETTINGS and key not in FORM_TEXT]
    for key, (label, limit) in TEXT_LIMITS.items():
        if len(str(form.get(key) or "")) > limit:
            problems.append(Problem(label, f"is {len(str(form[key]))} characters long; use at most {limit}"))
    overrides: dict = {"train": {}, "prior": {}, "output": {}, "data": {}}
    for key, (group, name, label, kind) in FORM_SETTINGS.items():
        value = form.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        parsed = _parse(value, kind)
        if parsed is None:
            problems.append(Problem(label, f"{str(value)[:40]!r} is not " + (
                "a whole number" if kind is int else "a number" if kind is float else "on or off")))
        else:
            overrides[group][name] = parsed
    return overrides, problems


def _parse(value, kind):
    """A form value as `kind` (int, float, or bool for None); None when it does not parse."""
    if kind is None:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if kind is float else value if isinstance(value, int) else float(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        return None
    if kind is int:
        return int(number) if isinstance(number, int) or (number == number and float(number).is_integer()) else None
    return number


def toy_scoring(model: str, class_noun: str, steps: int) -> dict:
    """Eval overrides for a job on the toy model whose class the toy world draws: six checkpoints
    scored with the open-set subject fidelity against the job's own photos, the best kept (as
    `dreambooth demo` does). Other jobs have no automatic judge here and are not scored."""
    from dreambooth.toyworld.render import CLASSES

    if model != "toy" or class_noun not in CLASSES:
        return {}
    return {"every": max(1, steps // 6), "scorer": "oracle", "num_per_prompt": 2, "num_class_images": 8,
            "select": "best", "subject": ""}  # drift from 8 class images: 2 could only say 0, 50 or 100 %


def build_run_config(form: dict, images_dir: Path):
    """The form's values as a `RunConfig`, validated only by the library's `load_config` (as the CLI
    is); raises `ConfigError` listing every bad field, in the page's words."""
    model = str(form.get("model") or "tiny-random").strip()
    overrides, problems = form_overrides(form)
    overrides["model"] = {"name": model}
    overrides["data"].update({"images": str(images_dir), "identifier": str(form.get("identifier", "")).strip(),
                              "class_noun": str(form.get("class_noun", "")).strip()})
    try:
        preset = preset_for(str(form.get("preset") or "fast-lora"), model)
        config = load_config(preset, {k: v for k, v in overrides.items() if v})
        scoring = toy_scoring(model, config.data.class_noun, config.train.steps)
        if config.output.checkpoint_every > config.train.steps or scoring:
            if config.output.checkpoint_every > config.train.steps:  # a short run still leaves a checkpoint midway
                overrides["output"]["checkpoint_every"] = max(1, config.train.steps // 2)
            overrides["eval"] = scoring
            config = load_config(preset, {k: v for k, v in overrides.items() if v})
    except DreamboothError as err:
        problems += err.problems
    if problems:
        raise ConfigError("fix these settings", [in_user_words(p) for p in problems])
    return config


def in_user_words(problem: Problem) -> Problem:
    """A library problem as the page says it: field labels instead of config keys, no CLI flags."""
    message = problem.message.replace(", e.g. --class-noun dog", ", e.g. dog").replace("`dreambooth token`", "Suggest")
    return Problem(USER_WORDS.get(problem.where, problem.where), message, problem.severity)


@lru_cache(maxsize=1)
def _tokenizer():
    """The CLIP BPE tokenizer shipped with the package (the vocabulary of SD 1.x and 2.x)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def identifier_problems(identifier: str, class_noun: str) -> list[Problem]:
    limit = TEXT_LIMITS["identifier"][1]
    if len(identifier.strip()) > limit:  # the tokenizer is never fed a huge string
        return [Problem("Identifier", f"is {len(identifier.strip())} characters long; use 1-{limit} "
                                      "(a rare short word such as sks works best)")]
    return [in_user_words(p) for p in check_identifier(_tokenizer(), identifier.strip(), class_noun.strip()[:40])]


def suggest(count: int = 6, seed: int = 0) -> list[str]:
    return suggest_identifiers(_tokenizer(), count, seed=seed)


def photo_problems(images_dir: Path, photos: list, resolution: int) -> list[dict]:
    """The library's folder checks (small, duplicate, too few, ...), each tied to a photo id if any."""
    if not images_dir.is_dir() or not photos:
        return [{"photo": None, "severity": "warning", "message": "no photos yet; add 3-10 photos of your subject"}]
    try:
        problems = check_images(images_dir, resolution).problems
    except DreamboothError as err:
        problems = err.problems
    by_name = {p.stored_name: p for p in photos}
    out = []
    for problem in problems:
        where = Path(problem.where)
        photo = by_name.get(where.name)
        message = problem.message
        for other in photos:  # name the photos the way the user knows them, never by stored path
            message = message.replace(str(images_dir / other.stored_name), other.original_name)
            message = message.replace(other.stored_name, other.original_name)
        message = message.replace(str(images_dir), "the set")
        out.append({"photo": photo.id if photo else None, "severity": problem.severity, "message": message})
    return out


def problems_json(problems: list[Problem]) -> list[dict]:
    return [{"where": p.where, "severity": p.severity, "message": p.message} for p in problems]
