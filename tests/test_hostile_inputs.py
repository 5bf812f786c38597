"""Attack cases on the CLI: each bad input gets a named message and exit 2, and nothing is lost.

Cheap cases call `dreambooth.cli.main` in-process; signals, locks and start-up noise need a
subprocess. Training cases use the tiny random model at 64 px for one to three steps.
"""
import json
import os
import shutil
import subprocess
import sys
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
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "step" in r] == [1, 2]


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
    from dreambooth.errors import ModelSourceError
    from dreambooth.training import prepare

    def broken(*a, **k):
        raise ModelSourceError("cannot load the model", [])

    run = tmp_path / "run"
    monkeypatch.setattr(prepare, "load_components", broken)
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


# --- settings that were silently replaced or accepted -----------------------------------------

def test_steps_zero_is_refused_not_replaced_by_the_preset(tmp_path, subject_dir, capsys):
    assert main(train_args(subject_dir, tmp_path / "run", steps=0)) == 2
    assert "train.steps: 0: must be in [1, 1000000]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_of_range_values_are_all_named_before_anything_is_written(tmp_path, subject_dir, capsys):
    bad = ["train.text_encoder_lr=-1", "prior.guidance=nan", "data.max_pixels=0", "train.lr=1e308",
           "data.resolution=100000", "prior.num_images=1e9", "train.seed=-1", "train.max_grad_norm=.inf"]
    args = train_args(subject_dir, tmp_path / "run", *[a for b in bad for a in ("--set", b)])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(b.split("=")[0] in err for b in bad) and "Traceback" not in err
    assert "prior.guidance: nan: must be a finite number" in err
    assert not (tmp_path / "run").exists()


def test_check_resolution_zero_is_a_named_error(subject_dir, capsys):
    assert main(["check", str(subject_dir), "--resolution", "0"]) == 2
    assert "--resolution: 0: must be in [64, 2048], a multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [(["--num", "0"], "--num"), (["--resolution", "100"], "--resolution"),
                                         (["--steps", "0"], "--steps"), (["--guidance", "nan"], "--guidance"),
                                         (["--lora-scale", "inf"], "--lora-scale")])
def test_generate_refuses_bad_numbers_before_loading(tmp_path, capsys, flags, named):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "a dog", "--output", str(out),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert f"{named}:" in err and "no-model" not in err and not out.exists()


@pytest.mark.parametrize("text,named", [("train: {lr: [1e-4\n", "mine.yaml is not valid YAML"),
                                        ("- a\n- b\n", "mine.yaml is not a mapping"),
                                        ("train: 5\n", "train: 5 is not a mapping of train.key"),
                                        ("\xff\xfe", "cannot read the preset")])
def test_malformed_preset_yaml_is_a_named_error(tmp_path, subject_dir, capsys, text, named):
    preset = tmp_path / "mine.yaml"
    preset.write_bytes(text.encode("latin-1"))
    assert main(train_args(subject_dir, tmp_path / "run", preset=str(preset))) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_priors_resolution_zero_is_refused_not_replaced(tmp_path, capsys):
    assert main(["priors", "--model", "tiny-random", "--class-noun", "dog", "--num", "1", "--resolution", "0",
                 "--cache", str(tmp_path / "cache")]) == 2
    assert "data.resolution: 0" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_malformed_set_value_is_a_named_error(tmp_path, subject_dir, capsys):
    assert main(train_args(subject_dir, tmp_path / "run", "--set", "output.sample_prompts=[a, b")) == 2
    assert "output.sample_prompts" in capsys.readouterr().err


def test_a_damaged_run_config_is_named_on_resume(tmp_path, subject_dir, capsys):
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, steps=1)) == 0
    (run / "config.yaml").write_text("model: {name: tiny-random\ndata: [")
    capsys.readouterr()
    assert main(train_args(subject_dir, run, "--resume", steps=2)) == 2
    err = capsys.readouterr().err
    assert "the run's saved configuration" in err and "YAML error" in err and "changed configuration" not in err


def test_output_that_is_a_file_is_refused(tmp_path, subject_dir, capsys):
    target = tmp_path / "run"
    target.write_text("mine")
    assert main(train_args(subject_dir, target)) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "mine"


@pytest.mark.parametrize("cuda,settings,named", [
    (False, ["train.mixed_precision=fp16"], ["train.mixed_precision", "bf16"]),
    (False, ["train.device=cuda"], ["train.device", "no CUDA GPU"]),
    (True, ["train.mixed_precision=fp16", "train.device=cpu"], ["train.mixed_precision", "train.device is cpu"])])
def test_a_device_or_precision_the_machine_lacks_is_refused_before_loading(tmp_path, subject_dir, capsys,
                                                                          monkeypatch, cuda, settings, named):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert main(train_args(subject_dir, tmp_path / "run", *[a for s in settings for a in ("--set", s)])) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in named) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("targets,named", [("[nope]", "names no module"), ("[]", "give module names")])
def test_bad_lora_targets_are_named(tmp_path, subject_dir, capsys, targets, named):
    assert main(train_args(subject_dir, tmp_path / "run", "--set", f"train.lora_targets={targets}",
                           preset="tiny-lora")) == 2
    err = capsys.readouterr().err
    assert "train.lora_targets" in err and named in err and "Traceback" not in err


def test_read_only_output_is_a_named_error(tmp_path, subject_dir, capsys, monkeypatch):
    """The tests may run as root, which ignores file modes, so the refusal of the kernel is simulated."""
    target = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(train_args(subject_dir, target)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {target}" in err and "Permission denied" in err


# --- nothing after the last step can lose the weights -----------------------------------------

def test_sample_images_zero_means_no_grids(tmp_path, subject_dir):
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, "--set", "output.sample_every=1")) == 0
    assert (run / "final" / "dreambooth.json").exists() and not list((run / "samples").iterdir())


def test_final_is_written_before_the_closing_samples(tmp_path, subject_dir, monkeypatch):
    from dreambooth.training import loop

    def broken(*a, **k):
        raise RuntimeError("sampling failed")
    monkeypatch.setattr(loop, "write_samples", broken)
    with pytest.raises(RuntimeError, match="sampling failed"):
        main(train_args(subject_dir, tmp_path / "run", "--set", "output.sample_images=1"))
    assert (tmp_path / "run" / "final" / "dreambooth.json").exists()



# --- damaged checkpoints are skipped, NaN weights are never "good" ------------------------------

def library_config(subject_dir, *extra):
    from dreambooth.config import load_config

    return load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                       ["train.steps=4", "output.checkpoint_every=1", "output.keep_checkpoints=3",
                        "output.sample_images=0", *extra])  # with a class image per step, B = 2


def damage(path: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    target = path / "trainable.safetensors"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        state = load_file(target)
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first] = state[first] * float("nan")
        save_file(state, target)


@pytest.mark.parametrize("how", ["truncated", "nan"])
def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, subject_dir, how):
    """step-00003 is damaged; resume warns, continues from step-00002 and ends bit-identical to a
    run that was never interrupted (on the CPU: bit equality across runs is not promised on CUDA)."""
    import threading

    import torch
    from safetensors.torch import load_file

    from dreambooth.training import events as ev
    from dreambooth.training import train

    config = library_config(subject_dir, "train.device=cpu")
    assert isinstance(train(config, tmp_path / "straight"), ev.Finished)
    stop = threading.Event()
    stopped = train(config, tmp_path / "run", stop=stop,
                    on_event=lambda e: isinstance(e, ev.StepDone) and e.step == 3 and stop.set())
    assert isinstance(stopped, ev.Stopped) and stopped.step == 3
    damage(tmp_path / "run" / "checkpoints" / "step-00003", how)
    notices = []
    last = train(config, tmp_path / "run", resume=True, on_event=lambda e: notices.append(e))
    assert isinstance(last, ev.Finished)
    warning = next(e.message for e in notices if isinstance(e, ev.Notice) and "damaged" in e.message)
    assert "step-00003" in warning and next(e for e in notices if isinstance(e, ev.Started)).start_step == 2
    unet = "final/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / unet), load_file(tmp_path / "run" / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, log) if "step" in r] == [1, 2, 3, 4]


def test_nan_weights_are_never_saved_nor_called_the_last_good_checkpoint(tmp_path, subject_dir, step_kind,
                                                                         poison_loss):
    """Step 2 has a finite loss but NaN gradients, so its update leaves NaN weights."""
    import torch

    from dreambooth.errors import TrainingDiverged
    from dreambooth.training import train

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    calls = poison_loss(on_pred=lambda n, pred: NanGradient.apply(pred) if n == 2 else pred)
    with pytest.raises(TrainingDiverged) as info:
        train(library_config(subject_dir, *step_kind[1]), tmp_path / "run")
    assert set(calls) == {step_kind[0]} and len(calls) >= 2  # the step meant ran, and its loss was poisoned
    assert "step 2" in str(info.value) and "step-00001" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints" / "step-00002").exists()


# --- a run works from any folder; commands start quietly --------------------------------------

def test_lora_run_with_a_relative_model_path_generates_from_another_folder(tmp_path, subject_dir, monkeypatch):
    from dreambooth.models.builtin import builtin_path

    shutil.copytree(builtin_path("tiny-random"), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    assert main(train_args(subject_dir, "run", "--model", "base", preset="tiny-lora", steps=1)) == 0
    info = json.loads((tmp_path / "run" / "final" / "dreambooth.json").read_text())
    assert info["base_model"] == str(tmp_path / "base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "a {identifier} {class}", "--num", "1",
                 "--steps", "1", "--output", "gen"]) == 0
    assert (elsewhere / "gen" / "grid-0000.png").exists()


NOISE = ("Failed to load", "pytree", "Enum subclass", "Detected no triton", "Traceback")


def test_train_starts_without_library_noise(tmp_path, subject_dir):
    """diffusers imports torchao, which logs kernels it cannot load; torch logs pytree deprecations."""
    command = [sys.executable, "-m", "dreambooth", *train_args(subject_dir, tmp_path / "run", steps=1)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DREAMBOOTH_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr
