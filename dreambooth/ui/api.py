"""The web app's operations, as plain methods returning JSON-ready dicts (the HTTP layer only routes).

Keeping them here, apart from `server.py`, lets tests call them directly and keeps every decision
(what a job shows, which files may be served) in one readable place.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

from dreambooth.errors import BadRequest, DreamboothError, NotFound, Problem
from dreambooth.models.builtin import cache_root
from dreambooth.prompts import fill_prompt
from dreambooth.ui import outputs, settings
from dreambooth.ui.jobs import Job, JobRunner, TrainFn, resumable
from dreambooth.ui.uploads import MAX_BYTES, MAX_FILES, MAX_PIXELS, PhotoStore, UploadRejected, display_name

SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def whole_number(body: dict, key: str, default: int, low: int, high: int) -> int:
    """body[key] as a whole number in [low, high]; anything else is a 400 that names the field."""
    value = body.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key}: {str(value)[:40]!r} is not a whole number from {low} to {high}")
    return value


def job_name(form: dict) -> str:
    """What the job list shows: subject, model, preset and when it started, e.g.
    "sks dog · toy · Fast LoRA · 2025-05-01 14:03"."""
    subject = f"{str(form.get('identifier', '')).strip()} {str(form.get('class_noun', '')).strip()}"
    preset = settings.PRESET_LABELS.get(str(form.get("preset")), str(form.get("preset")))
    return " · ".join([subject, str(form.get("model") or "tiny-random"), preset, time.strftime("%Y-%m-%d %H:%M")])


def sample_prompts(config: dict) -> list[str]:
    """The filled prompts of the validation grids' rows, so the page can label them."""
    data, out = config.get("data", {}), config.get("output", {})
    return [fill_prompt(p, data.get("identifier", ""), data.get("class_noun", ""))
            for p in out.get("sample_prompts", [])]


def default_workspace() -> Path:
    return cache_root() / "ui"


class App:
    """Photo sets, the job queue and generation behind one object; `start()` before use."""

    def __init__(self, workspace: Path, train_fn: TrainFn | None = None, verbose: bool = False):
        self.workspace = Path(workspace)
        self.photos = PhotoStore(self.workspace / "uploads")
        self.runner = JobRunner(self.workspace, train_fn)
        self.generator = outputs.Generator(self.runner)
        self.verbose = verbose

    def start(self) -> "App":
        self.runner.start()
        return self

    def shutdown(self) -> None:
        self.runner.shutdown()

    # --- page set-up -----------------------------------------------------------------------------
    def info(self) -> dict:
        return {"models": settings.model_options(), "online": settings.hub_online(),
                "model_notes": {"toy": settings.TOY_NOTE},
                "presets": [{"value": k, "label": v} for k, v in settings.PRESET_LABELS.items()],
                "limits": {"files": MAX_FILES, "bytes": MAX_BYTES, "pixels": MAX_PIXELS}}

    def presets(self, purpose: str, model: str) -> dict:
        return settings.preset_defaults(purpose, model)

    # --- photos ----------------------------------------------------------------------------------
    def new_set(self) -> dict:
        return self.get_set(self.photos.create().id)

    def get_set(self, set_id: str, resolution: int = 512) -> dict:
        photo_set = self.photos.get(set_id)
        photos = [dict(asdict(p), url=f"/api/photosets/{set_id}/thumbs/{p.id}") for p in photo_set.photos]
        for p in photos:
            p.pop("stored_name")  # internal
        problems = settings.photo_problems(self.photos.images_dir(set_id), photo_set.photos, resolution)
        return {"id": set_id, "photos": photos, "rejected": photo_set.rejected, "problems": problems}

    def upload(self, set_id: str, name: str, data: bytes) -> dict:
        try:
            photo = self.photos.add(set_id, name, data)
        except UploadRejected as rejected:
            raise BadRequest(f"{display_name(name)} {rejected.summary}") from None
        return {"id": photo.id, "name": photo.original_name}

    def delete_photo(self, set_id: str, photo_id: str) -> dict:
        self.photos.remove(set_id, photo_id)
        return {"ok": True}

    def clear_rejected(self, set_id: str) -> dict:
        self.photos.clear_rejected(set_id)
        return {"ok": True}

    # --- subject and model -----------------------------------------------------------------------
    def check_identifier(self, identifier: str, class_noun: str) -> dict:
        return {"problems": settings.problems_json(settings.identifier_problems(identifier, class_noun))}

    def suggest(self, seed: int) -> dict:
        return {"identifiers": settings.suggest(6, seed)}

    def check_model(self, model: str) -> dict:
        return {"problems": settings.problems_json(settings.model_problems(model))}

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, body: dict) -> dict:
        """Validate everything the library would reject, then queue; nothing loads here."""
        set_id, form = str(body.get("set_id", "")), dict(body.get("form") or {})
        photo_set = self.photos.get(set_id)
        problems = settings.model_problems(str(form.get("model", "tiny-random")))
        try:
            settings.build_run_config(form, self.photos.images_dir(set_id))
        except DreamboothError as err:
            problems += err.problems
        # photo problems are already in the page's words; they name no field, so `where` stays empty
        problems += [Problem("", p["message"]) for p in self.get_set(set_id)["problems"] if p["severity"] == "error"]
        if not photo_set.photos:
            problems.append(Problem("", "add 3-10 photos of your subject first"))
        if problems:
            raise BadRequest("fix these before training", problems)

        def prepare(images_dir: Path) -> dict:
            frozen = self.photos.copy_images(set_id, images_dir)  # exactly the photos the page shows
            config = settings.build_run_config(form, images_dir).to_dict()
            form["photo_names"] = {p.stored_name: p.original_name for p in frozen.photos}
            return config

        return self.job_view(self.runner.submit(job_name(form), form, prepare))

    def list_jobs(self) -> dict:
        return {"jobs": [self.job_view(job) for job in reversed(self.runner.list())]}

    def job_json(self, job_id: str) -> dict:
        return self.job_view(self.runner.get(job_id))

    def job_view(self, job: Job) -> dict:
        """The job as the page needs it: state, queue place, and URLs instead of paths."""
        view = asdict(job)
        base = f"/api/jobs/{job.id}"
        view["queue_position"] = self.runner.queue_position(job.id)
        view["sample_urls"] = [f"{base}/samples/{Path(s).name}" for s in job.samples]
        view["generated"] = [dict(g, url=f"{base}/generated/{g['file']}") for g in job.generated]
        view["notices"] = [self._readable(job, n) for n in job.notices]
        view["error"] = self._readable(job, job.error) if job.error else None
        view["model"] = job.config.get("model", {}).get("name")
        view["mode"] = job.config.get("train", {}).get("mode")
        view["resumable"] = resumable(job)
        view["sample_prompts"] = sample_prompts(job.config)
        return view

    def _readable(self, job: Job, text: str) -> str:
        """Library messages name stored files by path; show the user's file names instead."""
        images = str(self.runner.images_dir(job.id))
        for stored, original in job.form.get("photo_names", {}).items():
            text = text.replace(f"{images}/{stored}", original)
        return text.replace(images, "the photos").replace(str(self.workspace), "workspace")

    def cancel(self, job_id: str) -> dict:
        return self.job_view(self.runner.cancel(job_id))

    def resume(self, job_id: str) -> dict:
        return self.job_view(self.runner.resume(job_id))

    # --- results ---------------------------------------------------------------------------------
    def generate(self, job_id: str, body: dict) -> dict:
        numbers = {key: whole_number(body, key, default, low, high) for key, default, low, high in
                   [("num", 4, 1, outputs.MAX_IMAGES_PER_CLICK), ("seed", 0, 0, 2**32 - 1), ("steps", 25, 1, 150)]}
        items = self.generator.generate(job_id, str(body.get("prompt", ""))[:2000], **numbers)
        base = f"/api/jobs/{job_id}"
        return {"images": [dict(g, url=f"{base}/generated/{g['file']}") for g in items]}

    def examples(self, job_id: str) -> dict:
        data = self.runner.get(job_id).config["data"]
        return {"prompts": outputs.example_prompts(data["class_noun"]), "identifier": data["identifier"],
                "class_noun": data["class_noun"]}

    def downloads(self, job_id: str) -> dict:
        return outputs.downloads(self.runner, job_id)

    def job_file(self, job_id: str, kind: str, name: str) -> Path:
        """A file of a job by kind and plain name; anything else is 'not found'."""
        folders = {"samples": self.runner.run_dir(job_id) / "samples", "final": self.runner.run_dir(job_id) / "final",
                   "generated": self.runner.folder(job_id) / "generated"}
        if not SAFE_FILE.match(name) or kind not in folders:
            raise NotFound("not found")
        path = (folders[kind] / name).resolve()
        if path.parent != folders[kind].resolve() or not path.is_file():
            raise NotFound("not found")
        return path

    def job_zip(self, job_id: str, kind: str) -> Path:
        self.runner.get(job_id)
        if kind == "final":
            return outputs.final_zip(self.runner, job_id)
        return outputs.generated_zip(self.runner, job_id)

    def export(self, job_id: str, fmt: str) -> Path:
        return outputs.export_file(self.runner, job_id, fmt)

