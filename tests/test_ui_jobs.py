"""The web app's library side: job queue, persistence across restarts, upload safety, HTTP guards.

Most queue tests use a scripted stand-in for `train_events` (same signature, same event types) so
they control timing exactly; one test cancels and resumes a real tiny-random training.
"""
from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.data.decode import decode_image
from dreambooth.errors import BadRequest, NotFound
from dreambooth.training import events as ev
from dreambooth.ui.api import App
from dreambooth.ui.jobs import JobRunner
from dreambooth.ui.settings import problems_json
from dreambooth.ui.uploads import MAX_BYTES, MAX_FILES, PhotoStore, UploadRejected


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


class ScriptedTrainer:
    """Stands in for `train_events`: 3 steps, each waits for `go`; honours `stop` like the real loop."""

    def __init__(self, steps: int = 3):
        self.steps, self.calls, self.go = steps, [], threading.Event()

    def __call__(self, config, output, *, resume=False, overwrite=False, stop=None):
        self.calls.append({"output": Path(output), "resume": resume, "overwrite": overwrite})
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "config.yaml").write_text("scripted\n")
        start = 1 if resume else 0
        yield ev.Started(start, self.steps, 10, "cpu", "no")
        for step in range(start + 1, self.steps + 1):
            self.go.wait(10)
            yield ev.StepDone(step, self.steps, 0.5, 0.4, 0.1, 1e-4, 0.01)
            if stop is not None and stop.is_set():
                checkpoint = Path(output) / "checkpoints" / f"step-{step:05d}"
                checkpoint.mkdir(parents=True)
                yield ev.CheckpointSaved(step, checkpoint)
                yield ev.Stopped(step, checkpoint)
                return
        yield ev.Finished(self.steps, Path(output) / "final", 0.1)


def submit(runner: JobRunner, name: str = "sks dog"):
    return runner.submit(name, {"identifier": "sks"}, lambda images: {"train": {"steps": 3}})


@pytest.fixture
def scripted(monkeypatch):
    """`build_config` accepts the scripted jobs' minimal config dicts."""
    monkeypatch.setattr("dreambooth.config.build_config", lambda data, problems=None: data)
    return ScriptedTrainer()


def test_queue_runs_one_job_at_a_time_in_order(tmp_path, scripted):
    runner = JobRunner(tmp_path, scripted).start()
    jobs = [submit(runner, f"job {i}") for i in range(3)]
    wait_for(lambda: runner.get(jobs[0].id).status == "running")
    assert [runner.get(j.id).status for j in jobs] == ["running", "queued", "queued"]
    assert [runner.queue_position(j.id) for j in jobs] == [None, 1, 2]
    scripted.go.set()
    wait_for(lambda: all(runner.get(j.id).status == "finished" for j in jobs))
    assert [c["output"].parent.name for c in scripted.calls] == [j.id for j in jobs]
    started = [runner.get(j.id).started for j in jobs]
    ended = [runner.get(j.id).ended for j in jobs]
    assert started[1] >= ended[0] and started[2] >= ended[1]  # never two at once
    runner.shutdown()


def test_cancel_queued_and_running_jobs(tmp_path, scripted):
    runner = JobRunner(tmp_path, scripted).start()
    first, second = submit(runner), submit(runner)
    wait_for(lambda: runner.get(first.id).status == "running")
    assert runner.cancel(second.id).status == "cancelled"
    runner.cancel(first.id)
    scripted.go.set()
    wait_for(lambda: runner.get(first.id).status == "stopped")
    job = runner.get(first.id)
    assert job.checkpoint == "checkpoints/step-00001" and job.resume_next
    assert len(scripted.calls) == 1  # the cancelled queued job never ran
    runner.shutdown()


def test_state_survives_restart_and_running_job_becomes_interrupted(tmp_path, scripted):
    crashed = JobRunner(tmp_path, scripted).start()
    running, waiting = submit(crashed), submit(crashed)
    wait_for(lambda: crashed.get(running.id).status == "running")
    # A new server on the same workspace, as after a crash (the old worker is still blocked).
    restarted_trainer = ScriptedTrainer()
    restarted_trainer.go.set()
    restarted = JobRunner(tmp_path, restarted_trainer).start()
    assert restarted.get(running.id).status == "interrupted"
    assert "server stopped" in restarted.get(running.id).notices[-1]
    wait_for(lambda: restarted.get(waiting.id).status == "finished")
    restarted.resume(running.id)
    wait_for(lambda: restarted.get(running.id).status == "finished")
    assert restarted_trainer.calls[-1]["resume"] is True and restarted_trainer.calls[-1]["overwrite"] is False
    saved = json.loads((tmp_path / "jobs" / running.id / "job.json").read_text())
    assert saved["status"] == "finished"
    crashed.shutdown(timeout=0.1)
    scripted.go.set()


def test_failed_training_reports_the_error_and_can_be_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr("dreambooth.config.build_config", lambda data, problems=None: data)

    def broken(config, output, **kwargs):
        yield ev.Notice("loading")
        yield ev.Phase("caching latents", 5)  # the model loaded
        raise RuntimeError("out of memory")

    runner = JobRunner(tmp_path, broken).start()
    job = submit(runner)
    wait_for(lambda: runner.get(job.id).status == "failed")
    assert "out of memory" in runner.get(job.id).error
    assert runner.resume(job.id).status == "queued"
    runner.shutdown()


def test_a_job_whose_model_did_not_load_offers_no_resume(tmp_path, monkeypatch):
    """Resuming would only fail the same way: the page shows no Resume and the API refuses it."""
    monkeypatch.setattr("dreambooth.config.build_config", lambda data, problems=None: data)

    def no_model(config, output, **kwargs):
        raise OSError("no file named model_index.json")
        yield  # a generator, like train_events

    app = App(tmp_path, no_model).start()
    job = app.runner.submit("sks dog", {}, lambda images: {"train": {"steps": 3}})
    wait_for(lambda: app.runner.get(job.id).status == "failed")
    assert app.job_json(job.id)["resumable"] is False
    with pytest.raises(BadRequest, match="model did not load"):
        app.resume(job.id)
    app.shutdown()


@pytest.mark.slow
def test_cancel_real_training_keeps_checkpoint_and_resume_finishes(tmp_path, subject_dir):
    """tiny-random: cancel after the first step -> Stopped with a checkpoint; resume continues from it."""
    from dreambooth.training.loop import train_events

    first_step, seen = threading.Event(), []

    def watched(*args, **kwargs):
        for event in train_events(*args, **kwargs):
            seen.append(event)
            if isinstance(event, ev.StepDone):
                first_step.set()
            yield event

    app = App(tmp_path / "ws", watched).start()
    photo_set = app.photos.create()
    for path in sorted(subject_dir.glob("*.png")):
        app.upload(photo_set.id, path.name, path.read_bytes())
    form = {"identifier": "sks", "class_noun": "dog", "model": "tiny-random", "preset": "fast-lora",
            "steps": 6, "prior": False}
    job = app.submit({"set_id": photo_set.id, "form": form})
    assert first_step.wait(120)
    app.cancel(job["id"])
    wait_for(lambda: app.runner.get(job["id"]).status == "stopped", 120)
    stopped = app.runner.get(job["id"])
    assert (app.runner.run_dir(job["id"]) / stopped.checkpoint).is_dir()
    assert isinstance(seen[-1], ev.Stopped) and stopped.step < 6
    app.resume(job["id"])
    wait_for(lambda: app.runner.get(job["id"]).status == "finished", 120)
    started = [e for e in seen if isinstance(e, ev.Started)]
    assert started[-1].start_step == stopped.step
    assert (app.runner.run_dir(job["id"]) / "final" / "dreambooth.json").exists()
    from dreambooth.ui.outputs import downloads, export_file

    labels = [item["format"] for item in downloads(app.runner, job["id"])["items"]]
    assert {"lora-peft", "lora-kohya", "single-file"} <= set(labels)
    kohya = export_file(app.runner, job["id"], "lora-kohya")
    assert kohya.stat().st_size > 0 and export_file(app.runner, job["id"], "lora-kohya") == kohya  # made once
    app.shutdown()


def test_submit_lists_every_problem_before_anything_loads(tmp_path):
    app = App(tmp_path).start()
    photo_set = app.photos.create()
    with pytest.raises(BadRequest) as raised:
        app.submit({"set_id": photo_set.id, "form": {"identifier": "two words", "class_noun": "",
                                                        "model": "no/such/model/here"}})
    text = json.dumps(problems_json(raised.value.problems))
    for expected in ("Class noun", "Identifier", "no/such/model/here", "add 3-10 photos"):
        assert expected in text
    for config_word in ("data.class_noun", "--class-noun"):  # the page speaks the user's words
        assert config_word not in text
    assert app.runner.list() == []
    app.shutdown()


def test_an_sdxl_model_is_offered_with_the_sdxl_presets(tmp_path, subject_dir):
    app = App(tmp_path, ScriptedTrainer(steps=1)).start()
    assert "tiny-random-xl" in [m["value"] for m in app.info()["models"]]
    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    picked = {purpose: app.presets(purpose, sdxl) for purpose in ("fast-lora", "full", "lean")}
    assert {k: v["preset"] for k, v in picked.items()} == {
        "fast-lora": "sdxl-lora", "full": "sdxl-full-24gb", "lean": "sdxl-lora-8gb"}
    assert all(v["resolution"] == 1024 and "SDXL" in v["about"]["full"] for v in picked.values())
    assert app.presets("fast-lora", "tiny-random-xl")["preset"] == "tiny-xl-lora"
    assert app.presets("full", "tiny-random-xl")["preset"] == "tiny-xl"
    sd15 = app.presets("fast-lora", "stable-diffusion-v1-5/stable-diffusion-v1-5")  # SD models keep theirs
    assert (sd15["preset"], sd15["resolution"]) == ("sd15-lora", 512) and "SDXL" not in sd15["about"]["full"]
    assert app.presets("fast-lora", "tiny-random")["preset"] == "tiny-lora"
    photo_set = app.photos.create()
    for path in sorted(subject_dir.glob("*.png"))[:3]:
        app.upload(photo_set.id, path.name, path.read_bytes())
    folder = tmp_path / "my-sdxl"  # a local SDXL folder is told by its UNet config (the hub is offline)
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text(json.dumps({
        "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "addition_embed_type": "text_time",
        "sample_size": 128}))
    form = {"identifier": "sks", "class_noun": "dog", "model": str(folder), "preset": "lean"}
    job = app.submit({"set_id": photo_set.id, "form": form})
    config = job["config"]
    assert (config["model"]["name"], config["data"]["resolution"], config["train"]["mode"]) == (
        str(folder), 1024, "lora")
    assert config["train"]["offload_frozen"] and config["prior"]["batch_size"] == 1  # sdxl-lora-8gb's switches
    app.cancel(job["id"])
    app.shutdown()


# --- uploads -------------------------------------------------------------------------------------
def png_bytes(size=(64, 64), colour=(200, 40, 40), **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG", **save_args)
    return buffer.getvalue()


def test_upload_limits_count_and_bytes(tmp_path):
    store = PhotoStore(tmp_path)
    photo_set = store.create()
    for i in range(MAX_FILES):
        store.add(photo_set.id, f"p{i}.png", png_bytes(colour=(i * 20, 0, 0)))
    with pytest.raises(UploadRejected, match="already has 10"):
        store.add(photo_set.id, "one-more.png", png_bytes())
    other = store.create()
    with pytest.raises(UploadRejected, match="MB limit"):
        store.add(other.id, "huge.png", b"\x89PNG" + b"0" * MAX_BYTES)
    assert [r["name"] for r in store.get(other.id).rejected] == ["huge.png"]


def test_upload_rejects_bombs_non_images_and_pickles(tmp_path):
    import pickle

    store = PhotoStore(tmp_path)
    photo_set = store.create()
    bomb = png_bytes(size=(10_000, 10_000), colour=(0, 0, 0))  # 100 MP of black, a few hundred kB
    with pytest.raises(UploadRejected, match="decompression bomb"):
        store.add(photo_set.id, "bomb.png", bomb)
    with pytest.raises(UploadRejected, match="not an image"):
        store.add(photo_set.id, "notes.jpg", b"just text")
    with pytest.raises(UploadRejected, match="not an image"):
        store.add(photo_set.id, "weights.png", pickle.dumps({"a": 1}))
    with pytest.raises(UploadRejected, match="damaged or truncated"):
        store.add(photo_set.id, "cut.png", png_bytes()[:-40])
    assert store.get(photo_set.id).photos == []
    assert not list((tmp_path / photo_set.id / "images").glob("*"))  # nothing rejected stays on disk


def test_a_photo_the_training_check_accepts_is_not_refused_by_the_upload(tmp_path):
    """One pixel limit: a 48 MP phone photo passes the library's decode, so the page takes it too."""
    photo = png_bytes(size=(8000, 6000), colour=(90, 120, 60))
    (tmp_path / "phone.png").write_bytes(photo)
    assert decode_image(tmp_path / "phone.png").image.size == (8000, 6000)
    store = PhotoStore(tmp_path / "uploads")
    photo_set = store.create()
    assert store.add(photo_set.id, "phone.png", photo).width == 8000


def test_the_page_offers_only_formats_the_exporters_write():
    from dreambooth.formats.exporters import FORMATS
    from dreambooth.ui.outputs import EXPORT_FORMATS, EXPORT_LABELS, EXPORT_NAMES

    offered = {fmt for formats in EXPORT_FORMATS.values() for fmt in formats}
    assert offered == set(EXPORT_LABELS) == set(EXPORT_NAMES) and offered <= set(FORMATS)


def test_upload_names_are_never_paths(tmp_path):
    store = PhotoStore(tmp_path / "uploads")
    photo_set = store.create()
    photo = store.add(photo_set.id, "../../evil.png", png_bytes())
    also = store.add(photo_set.id, "..\\..\\win.png", png_bytes(colour=(0, 0, 200)))
    assert photo.original_name == "evil.png" and also.original_name == "win.png"
    stored = sorted(p.name for p in (tmp_path / "uploads" / photo_set.id / "images").iterdir())
    assert stored == sorted([photo.stored_name, also.stored_name])
    assert all(name.startswith((photo.id, also.id)) and name.endswith(".png") for name in stored)
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.rglob("evil.png"))
    with pytest.raises(NotFound):
        store.images_dir("../x")


def test_upload_applies_exif_rotation_and_reports_checks(tmp_path, subject_dir):
    app = App(tmp_path)
    photo_set = app.photos.create()
    image = Image.open(sorted(subject_dir.glob("*.png"))[0]).convert("RGB").resize((40, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    app.upload(photo_set.id, "phone.jpg", buffer.getvalue())
    app.upload(photo_set.id, "copy.jpg", buffer.getvalue())
    view = app.get_set(photo_set.id, resolution=64)
    assert view["photos"][0]["exif_rotated"] and (view["photos"][0]["width"], view["photos"][0]["height"]) == (80, 40)
    messages = " ".join(p["message"] for p in view["problems"])
    assert "smaller than the training resolution" in messages
    assert re.search(r"exact duplicate of (phone|copy)\.jpg", messages)  # named as uploaded
    assert str(tmp_path) not in messages  # stored paths never reach the page
    assert any(p["photo"] for p in view["problems"])


def test_parallel_uploads_keep_every_photo_and_the_limit(tmp_path):
    """12 uploads at once: exactly 10 listed and on disk, 2 refused, and a job copies those 10."""
    from concurrent.futures import ThreadPoolExecutor

    store = PhotoStore(tmp_path / "uploads")
    photo_set = store.create()
    photos = [png_bytes(colour=(20 * i, 255 - 20 * i, 7 * i)) for i in range(12)]

    def add(i):
        try:
            return store.add(photo_set.id, f"p{i}.png", photos[i])
        except UploadRejected as rejected:
            return rejected

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(add, range(12)))
    listed = store.get(photo_set.id)
    assert sum(isinstance(r, UploadRejected) for r in results) == 2
    assert len(listed.photos) == MAX_FILES and len(listed.rejected) == 2
    on_disk = sorted(p.name for p in store.images_dir(photo_set.id).iterdir())
    assert on_disk == sorted(p.stored_name for p in listed.photos)
    (store.images_dir(photo_set.id) / "stray.png").write_bytes(photos[0])  # not in set.json: never trained on
    store.copy_images(photo_set.id, tmp_path / "job-images")
    assert sorted(p.name for p in (tmp_path / "job-images").iterdir()) == sorted(p.stored_name for p in listed.photos)


def test_settings_out_of_range_or_unreadable_are_refused_in_the_pages_words(tmp_path, subject_dir):
    app = App(tmp_path).start()
    photo_set = app.photos.create()
    for path in sorted(subject_dir.glob("*.png"))[:3]:
        app.upload(photo_set.id, path.name, path.read_bytes())
    base = {"identifier": "sks", "class_noun": "dog", "model": "tiny-random", "preset": "fast-lora"}
    bad = {"class_images": 1e9, "steps": 1e8, "lr": 1e308, "resolution": 100000}
    with pytest.raises(BadRequest) as raised:
        app.submit({"set_id": photo_set.id, "form": dict(base, **bad)})
    wheres = {p.where for p in raised.value.problems}
    assert {"Class images", "Steps", "Learning rate", "Resolution"} <= wheres
    with pytest.raises(BadRequest) as raised:  # a typo is named, never replaced by the preset's value
        app.submit({"set_id": photo_set.id, "form": dict(base, lr="abc", identifier="x" * 10_000)})
    text = json.dumps(problems_json(raised.value.problems))
    assert "Learning rate" in text and "'abc' is not a number" in text
    assert "Identifier" in text and "at most 32" in text
    assert app.check_identifier("x" * 10_000, "dog")["problems"][0]["message"].startswith("is 10000 characters")
    assert app.runner.list() == []
    job = app.submit({"set_id": photo_set.id, "form": dict(base, steps="3", lr="2e-4", class_images="2")})
    assert job["config"]["train"]["steps"] == 3 and job["config"]["train"]["lr"] == 2e-4
    assert job["config"]["prior"]["num_images"] == 2
    assert job["name"].startswith("sks dog · tiny-random · Fast LoRA · 20")  # subject, model, preset, date
    app.cancel(job["id"])
    app.shutdown()


def test_progress_shows_slow_phases_and_a_smoothed_time_left(tmp_path):
    """Steps of 1 s with one 200 s validation render between them: the time left stays near
    (steps left) x 1 s, and the job says it is rendering instead of sitting at a step."""
    from dreambooth.ui.jobs import Job, apply_event

    job = Job("0" * 12, "j", {}, {})
    run = tmp_path / "run"
    apply_event(job, ev.Started(0, 40, 10, "cpu", "no"), run)
    for step in range(1, 21):
        apply_event(job, ev.StepDone(step, 40, 0.1, 0.1, 0.0, 1e-4, 1.0 + 0.5 * (step % 2)), run)
    apply_event(job, ev.Phase("validation images", 8), run)
    assert job.phase == "validation images" and job.phase_total == 8 and job.phase_started
    apply_event(job, ev.StepDone(21, 40, 0.1, 0.1, 0.0, 1e-4, 200.0), run)  # timed the render too
    assert job.phase == "training"
    assert 19 * 1.0 <= job.eta_seconds <= 19 * 1.5
    etas = []
    for step in range(22, 30):
        apply_event(job, ev.StepDone(step, 40, 0.1, 0.1, 0.0, 1e-4, 1.0 + 0.5 * (step % 2)), run)
        etas.append(job.eta_seconds)
    assert all(later < earlier for earlier, later in zip(etas, etas[1:]))  # no jumps back up


class ClassImagesTrainer:
    """Stands in for train_events during class-image generation: one image per 0.2 s, 500 to make,
    checking `stop` between images as the library's ensure_class_images does."""

    def __call__(self, config, output, *, resume=False, overwrite=False, stop=None):
        yield ev.Phase("class images", 500)
        for done in range(1, 501):
            time.sleep(0.2)
            if stop is not None and stop.is_set():
                return
            yield ev.ClassImagesProgress(done, 500)


def test_cancel_reaches_the_stop_flag_the_trainer_got(tmp_path, monkeypatch):
    monkeypatch.setattr("dreambooth.config.build_config", lambda data, problems=None: data)
    runner = JobRunner(tmp_path, ClassImagesTrainer()).start()
    job = submit(runner)
    wait_for(lambda: runner.get(job.id).class_done >= 1)
    began = time.monotonic()
    runner.cancel(job.id)
    wait_for(lambda: runner.get(job.id).status != "running", 5)
    assert time.monotonic() - began < 3
    runner.shutdown()


@pytest.mark.slow
def test_cancel_during_real_class_images_ends_the_job_within_seconds(tmp_path, subject_dir):
    """tiny-random with 2000 class images to make: Cancel while they are made ends the job in seconds.

    Needs `priors.ensure_class_images` to honour the training's stop flag between batches.
    """
    app = App(tmp_path / "ws").start()
    photo_set = app.photos.create()
    for path in sorted(subject_dir.glob("*.png")):
        app.upload(photo_set.id, path.name, path.read_bytes())
    form = {"identifier": "sks", "class_noun": "dog", "model": "tiny-random", "preset": "fast-lora",
            "steps": 4, "prior": True, "class_images": 2000}
    job = app.submit({"set_id": photo_set.id, "form": form})
    wait_for(lambda: app.runner.get(job["id"]).phase == "class images", 120)
    time.sleep(1.0)
    began = time.monotonic()
    app.cancel(job["id"])
    wait_for(lambda: app.runner.get(job["id"]).status != "running", 30)
    assert time.monotonic() - began < 10
    app.shutdown()


def test_generate_works_on_every_click_and_across_lora_jobs(tmp_path, subject_dir):
    """Two finished LoRA jobs: generate twice on one, switch, switch back; every click answers."""
    import shutil

    app = App(tmp_path / "ws").start()
    photo_set = app.photos.create()
    for path in sorted(subject_dir.glob("*.png"))[:3]:
        app.upload(photo_set.id, path.name, path.read_bytes())
    form = {"identifier": "sks", "class_noun": "dog", "model": "tiny-random", "preset": "fast-lora",
            "steps": 2, "prior": False, "sample_every": 0}
    first = app.submit({"set_id": photo_set.id, "form": form})["id"]
    wait_for(lambda: app.runner.get(first).status in ("finished", "failed"), 240)
    assert app.runner.get(first).status == "finished", app.runner.get(first).error
    app.shutdown()
    second = "f" * 12  # a copy of the finished job, as a second LoRA job on the same base model
    shutil.copytree(app.runner.folder(first), app.runner.folder(first).parent / second)
    copied = app.runner.folder(first).parent / second / "job.json"
    copied.write_text(json.dumps(dict(json.loads(copied.read_text()), id=second, created=time.time())))
    app = App(tmp_path / "ws").start()
    for job_id in (first, first, second, first, second):
        images = app.generate(job_id, {"prompt": "a {identifier} {class}", "num": 1, "steps": 2})["images"]
        assert len(images) == 1 and app.job_file(job_id, "generated", images[0]["file"]).is_file()
    assert len(app.runner.get(first).generated) == 3
    app.shutdown()


def test_toy_world_jobs_are_scored_against_their_own_photos_and_show_the_scores(tmp_path, subject_dir):
    """A job on the toy model whose class the toy world draws scores six checkpoints with the
    open-set subject fidelity (no built-in subject named: the uploaded photos are the subject) and
    keeps the best; a job on another model is not scored. Evaluated and Selected events reach the
    job's view."""
    from dreambooth.ui.jobs import Job, apply_event
    from dreambooth.ui.settings import build_run_config

    toy = build_run_config({"identifier": "sks", "class_noun": "dog", "model": "toy", "preset": "full",
                            "steps": "600"}, subject_dir)
    assert (toy.eval.every, toy.eval.scorer, toy.eval.select, toy.eval.subject) == (100, "oracle", "best", "")
    assert toy.eval.num_class_images == 8  # drift from more than the 2 images per prompt
    not_toy_class = build_run_config({"identifier": "sks", "class_noun": "robot", "model": "toy", "preset": "full"},
                                     subject_dir)
    other = build_run_config({"identifier": "sks", "class_noun": "dog", "model": "tiny-random"}, subject_dir)
    assert not_toy_class.eval.every == 0 and other.eval.every == 0

    job = Job("0" * 12, "j", {}, {})
    for step, fidelity in ((100, 0.4), (200, 0.9), (200, 0.8)):  # a re-scored step replaces its row
        apply_event(job, ev.Evaluated(step, {"step": step, "fidelity": fidelity, "prompt_fidelity": 0.9,
                                             "drift": 0.0, "other": 1}), tmp_path)
    apply_event(job, ev.Selected(200, "best subject fidelity with prompt fidelity >= 0.75"), tmp_path)
    assert job.scores == [{"step": 100, "fidelity": 0.4, "prompt_fidelity": 0.9, "drift": 0.0},
                          {"step": 200, "fidelity": 0.8, "prompt_fidelity": 0.9, "drift": 0.0}]
    assert job.selected == {"step": 200, "reason": "best subject fidelity with prompt fidelity >= 0.75"}
