"""Attack cases on the CLI: each bad input gets a named message and exit 2, and nothing is lost.

Cheap cases call `dreambooth.cli.main` in-process; signals, locks and start-up noise need a
subprocess. Training cases use the tiny random model at 64 px for one to three steps.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth.cli import main

FAST = ["--set", "prior.enabled=false", "--set", "output.sample_images=0"]


def train_args(images, output, *extra, preset="tiny", steps=2):
    return ["train", "--images", str(images), "--class-noun", "dog", "--preset", preset, "--output", str(output),
            "--steps", str(steps), *FAST, *extra]


def copy_photos(subject_dir, target: Path, count=3) -> Path:
    target.mkdir(parents=True)
    for p in sorted(subject_dir.iterdir())[:count]:
        shutil.copy(p, target / p.name)
    return target


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- train --overwrite never deletes what is not a run ----------------------------------------

def test_overwrite_refuses_an_output_that_contains_the_photos(tmp_path, subject_dir, capsys):
    photos = copy_photos(subject_dir, tmp_path / "d" / "photos")
    (tmp_path / "d" / "keep.txt").write_text("x")
    before = tree(tmp_path / "d")
    assert main(train_args(photos, tmp_path / "d", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "images folder" in err and "Traceback" not in err
    assert tree(tmp_path / "d") == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_equal_to_or_inside_the_photos_is_refused(tmp_path, subject_dir, capsys, where):
    photos = copy_photos(subject_dir, tmp_path / "photos")
    output = photos if where == "same" else photos / "run"
    assert main(train_args(photos, output)) == 2
    assert "images folder" in capsys.readouterr().err
    assert tree(photos) == sorted(p.name for p in photos.iterdir()) and not (photos / "run").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, subject_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "config.yaml").write_text("mine: 1\n")  # a user's own file with a run's name
    assert main(train_args(subject_dir, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "nothing in it is deleted" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]


def test_overwrite_replaces_a_run_but_keeps_a_users_file_in_it(tmp_path, subject_dir):
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, steps=1)) == 0
    assert (run / ".dreambooth-run").exists()
    (run / "notes.txt").write_text("mine")
    assert main(train_args(subject_dir, run, "--overwrite", steps=2)) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


# --- one process per run directory ------------------------------------------------------------

def test_second_process_on_a_locked_run_is_refused_with_the_pid(tmp_path, subject_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('ok', flush=True); "
        "time.sleep(60)"), str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert main(train_args(subject_dir, run)) == 2
        err = capsys.readouterr().err
        assert "in use by another training process" in err and f"PID {holder.pid}" in err and str(run) in err
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(train_args(subject_dir, run, steps=1)) == 0  # the kernel dropped the dead holder's lock


# --- a failed start does not block the corrected command --------------------------------------

@pytest.mark.parametrize("rerun", [[], ["--resume"]])
def test_a_run_that_never_started_can_be_started_again(tmp_path, subject_dir, capsys, monkeypatch, rerun):
    """The first start fails while loading the model (as `--model` of a broken folder does); the
    corrected command, with or without --resume, must start the run rather than refuse it."""
    import dreambooth.models as models
    from dreambooth.errors import ModelSourceError

    def broken(*a, **k):
        raise ModelSourceError("cannot load the model", [])

    run = tmp_path / "run"
    monkeypatch.setattr(models, "load_components", broken)
    assert main(train_args(subject_dir, run, "--model", "tiny-random-v")) == 2
    assert (run / "config.yaml").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(train_args(subject_dir, run, *rerun)) == 0, capsys.readouterr().err
    assert json.loads((run / "final" / "dreambooth.json").read_text())["base_model"] == "tiny-random"


def test_a_missing_model_is_refused_before_the_run_folder_exists(tmp_path, subject_dir, capsys):
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, "--model", str(tmp_path / "nonexistent"))) == 2
    assert "nonexistent" in capsys.readouterr().err and not run.exists()
