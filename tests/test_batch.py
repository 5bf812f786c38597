"""`dreambooth batch`: a manifest of subjects, each a run directory, on Ray or a local worker pool;
shared class images made once even by processes that want them at the same moment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dreambooth.batch import read_manifest, run_batch
from dreambooth.batch.status import BatchStatus
from dreambooth.cli import main
from dreambooth.errors import ConfigError
from dreambooth.rundir import is_run_dir

FAST = ["train.steps=2", "data.resolution=64", "output.sample_images=0", "output.checkpoint_every=0"]


def photos(folder: Path, subject: str = "dog", n: int = 3) -> Path:
    from dreambooth.toyworld import render_subject

    folder.mkdir(parents=True)
    for i in range(n):
        render_subject(subject, "plain", seed=i).save(folder / f"{subject}{i}.png")
    return folder


def write_manifest(path: Path, subjects: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({**top, "subjects": subjects}))
    return path


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_batch_isolates_a_failure_and_rerun_retries_only_it(tmp_path, ray_session):
    photos(tmp_path / "rex"), photos(tmp_path / "tom", "cat")
    bad = photos(tmp_path / "bad")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a truncated JPEG
    cache = tmp_path / "class-images"
    manifest = write_manifest(tmp_path / "pets.yaml", [
        {"images": "rex", "class_noun": "dog"},
        {"images": "tom", "class_noun": "dog", "identifier": "zwx"},  # same class: shares rex's class images
        {"images": "bad", "class_noun": "dog"},
    ], defaults={"preset": "tiny", "set": [*FAST, f"prior.cache={cache}"]})
    lines = []
    status = run_batch(read_manifest(manifest), backend="ray", print_line=lines.append)

    report = json.loads((tmp_path / "pets" / "batch.json").read_text())
    assert [s["status"] for s in report["subjects"]] == ["done", "done", "failed"]
    assert "broken.jpg" in report["subjects"][2]["error"] and report["counts"]["failed"] == 1
    assert not report["active"] and not report["complete"] and report["backend"] == "ray"
    assert all(is_run_dir(tmp_path / "pets" / name) for name in ("rex", "tom"))
    assert not is_run_dir(tmp_path / "pets" / "bad")
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1  # both runs used one set of class images
    assert json.loads((folders[0] / "manifest.json").read_text())["images"] == [f"{i:05d}.png" for i in range(4)]
    assert any("bad failed" in line for line in lines) and "broken.jpg" in status.summary()

    (bad / "broken.jpg").unlink()  # the user fixes the photos and runs the manifest again
    finished = {name: (tmp_path / "pets" / name / "final").stat().st_mtime_ns for name in ("rex", "tom")}
    status = run_batch(read_manifest(manifest), backend="ray", print_line=lines.append)
    assert [r["status"] for r in status.rows] == ["skipped", "skipped", "done"]
    assert json.loads((tmp_path / "pets" / "batch.json").read_text())["complete"]
    assert finished == {name: (tmp_path / "pets" / name / "final").stat().st_mtime_ns for name in ("rex", "tom")}
    assert is_run_dir(tmp_path / "pets" / "bad")


def test_local_pool_resumes_a_stopped_run_and_trains_a_new_one(tmp_path, capsys):
    import threading

    from dreambooth.training import events as ev
    from dreambooth.training import train

    photos(tmp_path / "rex"), photos(tmp_path / "tom", "cat")
    manifest = write_manifest(tmp_path / "m.yaml", [
        {"images": "rex", "class_noun": "dog", "output": "runs/rex"},
        {"images": "tom", "class_noun": "cat", "name": "tom-the-cat"},
    ], output="out", defaults={"preset": "tiny", "steps": 4,
                               "set": ["prior.enabled=false", "data.resolution=64", "output.sample_images=0"]})
    rex = read_manifest(manifest).subjects[0]
    stop = threading.Event()
    last = train(rex.config, rex.output, stop=stop,
                 on_event=lambda e: stop.set() if isinstance(e, ev.StepDone) and e.step == 2 else None)
    assert isinstance(last, ev.Stopped) and not is_run_dir(rex.output)
    before = (rex.output / "log.jsonl").read_text().splitlines()

    assert main(["batch", str(manifest), "--backend", "local", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "tom-the-cat" in out and "2/2 done" in out
    log = (rex.output / "log.jsonl").read_text().splitlines()
    assert log[:len(before)] == before  # resumed: steps 1-2 are the stopped run's, not trained again
    assert [json.loads(r)["step"] for r in log if "step" in json.loads(r)] == [1, 2, 3, 4]
    assert is_run_dir(tmp_path / "out" / "tom-the-cat")
    report = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert report["backend"] == "local" and report["slots"] == 2 and report["counts"]["done"] == 2
    assert (tmp_path / "out" / "logs" / "01-tom-the-cat.log").exists()


CLASS_IMAGES = """
import json, sys, time
from pathlib import Path
from dreambooth.config import load_config
from dreambooth.models import load_components
from dreambooth.priors import class_image_key, ensure_class_images
from dreambooth.sampling import make_pipeline

cache, folder = sys.argv[1], Path(sys.argv[2])
config = load_config("tiny", {"data": {"class_noun": "dog"}}, ["prior.steps=2"])
components = load_components(config.model.name)
key = class_image_key(components.folder, config)
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.02)
built, seen = [], []
def make_pipe():
    built.append(1)
    return make_pipeline(components, config.prior.sampler)
paths = ensure_class_images(key, 3, make_pipe, cache_dir=cache, batch_size=1, progress=lambda d, t: seen.append(d))
(folder / f"report-{sys.argv[3]}").write_text(json.dumps({"built": len(built), "seen": seen,
                                                          "paths": [str(p) for p in paths]}))
"""


def test_two_processes_make_shared_class_images_once(tmp_path):
    from dreambooth.models import builtin_path

    builtin_path("tiny-random")  # built once here, not raced by the two processes
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", CLASS_IMAGES, str(cache), str(tmp_path), str(i)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process died loading"
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both start asking for the same three images at once
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    reports = [json.loads((tmp_path / f"report-{i}").read_text()) for i in range(2)]
    assert sorted(r["built"] for r in reports) == [0, 1]  # one made them, the other waited and reused them
    assert reports[0]["paths"] == reports[1]["paths"] and len(reports[0]["paths"]) == 3
    waiter = next(r for r in reports if r["built"] == 0)
    assert waiter["seen"][-1] == 3  # it reported the other's progress while it waited
    folder = Path(reports[0]["paths"][0]).parent
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["latents"] == [f"{i:05d}.safetensors" for i in range(3)]
    assert manifest["images"] == [f"{i:05d}.png" for i in range(3)]  # previews of the first ones
    assert sorted(p.name for p in folder.iterdir()) == sorted(  # and no temporaries
        [*(f"{i:05d}.png" for i in range(3)), *(f"{i:05d}.safetensors" for i in range(3)), "manifest.json"])


def test_manifest_problems_are_all_reported_before_anything_starts(tmp_path, capsys):
    photos(tmp_path / "a" / "rex"), photos(tmp_path / "b" / "rex")
    manifest = write_manifest(tmp_path / "m.yaml", [
        {"images": "a/rex", "class_noun": "dog", "colour": "brown"},
        {"images": "b/rex", "class_noun": "dog"},  # derives the same run dir as subjects[0]
        {"images": "missing", "class_noun": "dog"},
        {"images": "a/rex", "name": "no-class"},
        {"images": "a/rex", "class_noun": "dog", "name": "lr", "set": ["train.lr=-1"]},
        {"images": "a/rex", "class_noun": "dog", "name": "p", "preset": "no-such-preset"},
    ], extra=1, defaults={"preset": "tiny"})
    with pytest.raises(ConfigError) as raised:
        read_manifest(manifest)
    where = [p.where for p in raised.value.problems]
    assert where == [f"{manifest}: extra", "subjects[0].colour", "subjects[2].images", "subjects[3].class_noun",
                     "subjects[4] (lr): train.lr", "subjects[5] (p): no-such-preset", "subjects[1].output"]
    messages = " ".join(p.message for p in raised.value.problems)
    assert "subjects[0] (rex)" in messages and "not a folder" in messages

    assert main(["batch", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "nothing was started" in err and "subjects[2].images" in err
    assert not (tmp_path / "m").exists()


def test_time_left_is_the_mean_finished_duration_per_round_of_workers(tmp_path):
    batch = type("B", (), {"folder": tmp_path, "manifest": tmp_path / "m.yaml",
                           "subjects": [type("S", (), {"index": i, "name": f"s{i}", "output": tmp_path / f"s{i}"})
                                        for i in range(5)]})
    status = BatchStatus(batch, "local", slots=2, print_line=lambda line: None)
    assert status.seconds_left() is None
    status.set(0, "done", {"seconds": 10.0})
    status.set(1, "done", {"seconds": 30.0})
    status.set(2, "failed", {"seconds": 1.0, "error": "boom"})
    status.set(3, "running")
    assert status.seconds_left() == 20.0 * 1  # two left, two at a time: one more round of 20 s
    assert "2/5 done, 1 running, 1 failed, about 20 s left" == status.progress()


def test_a_second_batch_on_one_folder_is_refused(tmp_path):
    from dreambooth.batch.run import BATCH_LOCK
    from dreambooth.errors import RunDirError
    from dreambooth.rundir import RunLock

    photos(tmp_path / "rex")
    batch = read_manifest(write_manifest(tmp_path / "m.yaml", [{"images": "rex", "class_noun": "dog"}],
                                         defaults={"preset": "tiny"}))
    batch.folder.mkdir()
    with RunLock.acquire(batch.folder / BATCH_LOCK), pytest.raises(RunDirError, match=str(os.getpid())):
        run_batch(batch, backend="local")
    assert not (batch.folder / "rex").exists() and not (batch.folder / "batch.json").exists()


def test_local_workers_get_one_visible_gpu_each(monkeypatch):
    import torch

    from dreambooth.batch.run import local_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_devices() == ["3", "5"]
    assert local_devices(3) == ["3", "5", "3"]  # more workers than GPUs share them in turn
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local_devices() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_devices() == [None] and local_devices(2) == [None, None]
