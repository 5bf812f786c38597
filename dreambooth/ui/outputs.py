"""What a finished job gives back: generated images, example prompts, and downloads.

Generation calls the library's `generate` on the job's run directory (which describes itself, so
`{identifier}` and `{class}` fill in). The loaded model of the last run used is kept, because
reloading a model per click would dominate the time of a small request; a LoRA run's adapter is
applied to it once, under a name of its own, so later clicks sample with it as it is. Downloads are the formats
`dreambooth.formats.exporters` writes (made once per job and format), plus final/ as a zip.
"""
from __future__ import annotations

import threading
import zipfile
from dataclasses import replace
from pathlib import Path

from dreambooth.atomic import replace_file
from dreambooth.errors import BadRequest, NotFound
from dreambooth.formats.exporters import export
from dreambooth.formats.lora import load_lora_into_pipeline
from dreambooth.generate import GenerationSettings, generate, load_for_generation
from dreambooth.prompts import LIVE_SUBJECT_PROMPTS, OBJECT_PROMPTS, fill_from_run_info, is_live_class
from dreambooth.sampling import make_pipeline
from dreambooth.ui.jobs import JobRunner

# Picked from the paper's benchmark lists by phrase, so the chips stay in step with prompts.py.
EXAMPLE_PHRASES = ("in the snow", "on the beach", "in the jungle", "wearing a santa hat", "in a chef outfit",
                   "with a city in the background", "floating on top of water", "a red ", "a shiny ")
MOON = "a {identifier} {class} on the moon"  # from the paper's figures, not its benchmark list
EXPORT_FORMATS = {"lora": ("lora-kohya", "single-file", "lora-peft"), "full": ("single-file", "diffusers")}
EXPORT_LABELS = {  # which download to pick, in the user's terms; the first of a mode is the default
    "lora-kohya": "LoRA (kohya): for ComfyUI / A1111",
    "single-file": "single file (.safetensors): any Stable Diffusion UI",
    "lora-peft": "LoRA (PEFT layout): Python diffusers only",
    "diffusers": "diffusers folder (zip): Python",
}
EXPORT_NAMES = {"single-file": "model.safetensors", "lora-peft": "lora-peft.safetensors",
                "lora-kohya": "lora-kohya.safetensors", "diffusers": "diffusers"}
MAX_IMAGES_PER_CLICK = 8


def example_prompts(class_noun: str) -> list[str]:
    """Example prompts with `{identifier}` and `{class}` placeholders, for one-click use."""
    source = LIVE_SUBJECT_PROMPTS if is_live_class(class_noun.strip().lower()) else OBJECT_PROMPTS
    templates = list(source)
    picked = [next(t for t in templates if phrase in t) for phrase in EXAMPLE_PHRASES
              if any(phrase in t for t in templates)]
    return [MOON] + picked


class Generator:
    """Runs one generation at a time and keeps the last loaded model."""

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self._lock = threading.Lock()
        self._loaded: tuple[str, object] | None = None

    def generate(self, job_id: str, prompt: str, *, num: int, seed: int, steps: int) -> list[dict]:
        job = self.runner.get(job_id)
        if job.status != "finished":
            raise BadRequest("this job has no finished model yet; generate after training finishes")
        if not prompt.strip():
            raise BadRequest("write a prompt, or click one of the examples")
        num = max(1, min(int(num), MAX_IMAGES_PER_CLICK))
        run_dir = self.runner.run_dir(job_id)
        out = self.runner.folder(job_id) / "generated"
        with self._lock:
            if self._loaded is None or self._loaded[0] != job_id:
                self._loaded = None  # free the old model before loading the next one
                self._loaded = (job_id, with_adapter(load_for_generation(run_dir), f"job_{job_id}"))
            loaded = self._loaded[1]
            paths = generate(run_dir, [prompt], out, num=num, seed=int(seed),
                             settings=GenerationSettings(steps=max(1, min(int(steps), 150))), loaded=loaded)
            filled = fill_from_run_info(prompt, loaded.info)
        batch = len({g.get("batch") for g in job.generated})  # one batch per click, newest shown first
        items = [{"file": p.name, "prompt": filled, "seed": int(seed) + k, "batch": batch} for k, p in enumerate(paths)]
        self.runner.update(job_id, lambda j: j.generated.extend(items))
        return items


def with_adapter(loaded, name: str):
    """Apply a run's LoRA to its loaded model once (as adapter `name`) and return it without a LoRA
    file, so `generate` does not load the adapter into the same UNet again on the next click."""
    if loaded.lora is None:
        return loaded
    load_lora_into_pipeline(make_pipeline(loaded.components), loaded.lora, adapter_name=name)
    return replace(loaded, lora=None)


def downloads(runner: JobRunner, job_id: str) -> dict:
    """The download links the page shows for a job."""
    job = runner.get(job_id)
    base = f"/api/jobs/{job_id}"
    items: list[dict] = []
    if job.status == "finished":
        mode = job.config.get("train", {}).get("mode", "full")
        items += [{"label": EXPORT_LABELS[fmt], "format": fmt, "url": f"{base}/export/{fmt}", "default": k == 0}
                  for k, fmt in enumerate(EXPORT_FORMATS.get(mode, ()))]
        items.append({"label": "the run's final/ folder (zip): to keep or resume with the CLI", "format": "final",
                      "url": f"{base}/final.zip"})
    if job.generated:
        items.append({"label": f"generated images ({len(job.generated)}, zip)", "format": "images",
                      "url": f"{base}/generated.zip"})
    return {"items": items, "note": None}


def export_file(runner: JobRunner, job_id: str, fmt: str) -> Path:
    """Export once per format into exports/<fmt>/ and return a file (folders are zipped)."""
    job = runner.get(job_id)
    mode = job.config.get("train", {}).get("mode", "full")
    if job.status != "finished" or fmt not in EXPORT_FORMATS.get(mode, ()):
        raise NotFound(f"no {fmt} download for this job")
    folder = runner.folder(job_id) / "exports" / fmt
    target = folder / EXPORT_NAMES[fmt]
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        export(runner.run_dir(job_id), fmt, target)
    return zip_folder(target, folder / f"{fmt}.zip") if target.is_dir() else target


def zip_folder(folder: Path, target: Path, only: set[str] | None = None) -> Path:
    """Zip `folder` (or the named files in it); written beside, then renamed, so readers never see half."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and (only is None or path.name in only):
                    archive.write(path, path.relative_to(folder).as_posix())

    return replace_file(target, write)


def generated_zip(runner: JobRunner, job_id: str) -> Path:
    job = runner.get(job_id)
    folder = runner.folder(job_id) / "generated"
    return zip_folder(folder, runner.folder(job_id) / "generated.zip", {g["file"] for g in job.generated})


def final_zip(runner: JobRunner, job_id: str) -> Path:
    return zip_folder(runner.run_dir(job_id) / "final", runner.folder(job_id) / "final.zip")

