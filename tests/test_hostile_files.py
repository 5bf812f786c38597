"""Hostile files: each case gets a named message (exit code 2 from the CLI), never hangs or exhausts memory,
and leaves no partial file.

Export cases (test_export_*): the target exists, the folder is read-only, the disk fills up, Ctrl-C
or SIGTERM arrives mid-write, and temporaries of an export killed outright are pruned later.
Image, class-image and message cases (test_image_*, test_priors_*, test_message_*): hostile photo
files, stopping class-image generation, and messages that name the real problem.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from PIL import Image
from test_images import RES, png_header_only, save_set

from dreambooth.cli import main
from dreambooth.data.images import check_images, load_rgb, prepare_image
from dreambooth.errors import ImageCheckError


def _partial_write_then(exc):
    """A stand-in for safetensors' save_file that leaves half a file, then fails like `exc`."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise exc
    return save_file


def _export(run, fmt, output):
    return main(["export", str(run), "--format", fmt, "--output", str(output)])


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_export_refuses_an_existing_output(full_run, tmp_path, capsys, kind):
    target = tmp_path / "taken"
    target.mkdir() if kind == "folder" else target.write_text("keep me")
    for fmt in ("single-file", "diffusers"):
        assert _export(full_run, fmt, target) == 2
        assert "taken: already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert target.is_dir() if kind == "folder" else target.read_text() == "keep me"


def test_export_below_a_file(full_run, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    assert _export(full_run, "single-file", tmp_path / "file.txt" / "m.safetensors") == 2
    assert "cannot write" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_export_into_a_read_only_folder(full_run, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode: make the write fail as it would
            monkeypatch.setattr("safetensors.torch.save_file",
                                _partial_write_then(PermissionError(errno.EACCES, "Permission denied")))
        assert _export(full_run, "single-file", folder / "m.safetensors") == 2
        assert "no permission to write here" in capsys.readouterr().err
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_export_when_the_disk_fills_up(full_run, tmp_path, capsys, monkeypatch, fmt):
    monkeypatch.setattr("safetensors.torch.save_file",
                        _partial_write_then(OSError(errno.ENOSPC, "No space left on device")))
    assert _export(full_run, fmt, tmp_path / "out") == 2
    assert "the disk is full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_export_interrupted_by_ctrl_c(full_run, tmp_path, capsys, monkeypatch, fmt):
    monkeypatch.setattr("safetensors.torch.save_file", _partial_write_then(KeyboardInterrupt()))
    assert _export(full_run, fmt, tmp_path / "out") == 2
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_interrupted_by_sigterm(full_run, tmp_path):
    """In a child process, since an unhandled SIGTERM would end the test run itself."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import safetensors.torch
        def save_file(tensors, filename, metadata=None):
            open(filename, "wb").write(b"0" * 4096)
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause() if hasattr(signal, "pause") else None
        safetensors.torch.save_file = save_file
        from dreambooth.cli import main
        sys.exit(main(["export", {str(full_run)!r}, "--format", "single-file",
                       "--output", {str(tmp_path / "out" / "m.safetensors")!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "interrupted" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_export_prunes_temporaries_of_killed_exports(full_run, tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".old.safetensors.tmp-{dead}-0123abcd"
    stale_folder = tmp_path / f".old-diffusers.tmp-{dead}-89abcdef"
    in_use = tmp_path / f".other.safetensors.tmp-{alive}-deadbeef"  # a running export's: kept
    stale_file.write_bytes(b"\0" * 1024)
    stale_folder.mkdir()
    (stale_folder / "unet").mkdir()
    in_use.write_bytes(b"")
    (tmp_path / ".keep").write_text("not ours")
    handler = signal.getsignal(signal.SIGTERM)
    assert _export(full_run, "single-file", tmp_path / "new.safetensors") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".keep", in_use.name, "new.safetensors"])
    assert signal.getsignal(signal.SIGTERM) is handler  # the export's SIGTERM handler is gone again

def errors_of(folder: Path, **kwargs) -> dict[str, str]:
    with pytest.raises(ImageCheckError) as caught:
        check_images(folder, RES, **kwargs)
    return {Path(p.where).name: p.message for p in caught.value.problems if p.severity == "error"}


def test_image_thin_strip_is_refused_from_its_header(tmp_path):
    save_set(tmp_path, 3)
    png_header_only(tmp_path / "strip.png", 40000, 2)  # ~300 bytes; resized to cover: 20 M pixels at 32
    errors = errors_of(tmp_path)
    assert set(errors) == {"strip.png"} and "40000x2" in errors["strip.png"] and "8:1" in errors["strip.png"]


def test_image_resize_of_a_strip_refuses_instead_of_allocating():
    with pytest.raises(ValueError, match="40000x2"):
        prepare_image(Image.new("RGB", (40000, 2)), 512)


def test_image_cover_size_over_the_pixel_limit_is_an_error(tmp_path):
    save_set(tmp_path, 3, size=(64, 64))
    Image.new("RGB", (100, 20), (200, 10, 10)).save(tmp_path / "wide.png")  # 5:1, under the ratio limit
    # 64x64 photos cover 32x32 in 4,096 pixels; the 5:1 one needs 5,120, over a limit of 5,000
    errors = errors_of(tmp_path, max_pixels=5_000)
    assert set(errors) == {"wide.png"} and "5,120 pixels" in errors["wide.png"]


def _check_in_thread(folder: Path, fifos: list[Path], seconds: float = 20.0) -> dict:
    """check_images in a daemon thread, so that a hang fails the test instead of stalling the run."""
    result = {}

    def run():
        try:
            result["report"] = check_images(folder, RES)
        except ImageCheckError as err:
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    hung = worker.is_alive()
    for fifo in fifos if hung else ():  # a writer releases the blocked open(); the reader then sees EOF
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader on this one
            pass
    assert not hung, "check_images blocked on a FIFO"
    return result


def test_image_fifo_named_jpg_is_an_error_not_a_hang(tmp_path):
    save_set(tmp_path, 3)
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    result = _check_in_thread(tmp_path, [fifo])
    problems = {Path(p.where).name: p for p in result["error"].problems}
    assert problems["photo.jpg"].severity == "error" and "FIFO" in problems["photo.jpg"].message


def test_image_special_files_are_named_and_links_to_photos_work(tmp_path):
    paths = save_set(tmp_path / "set", 3)
    folder = tmp_path / "set"
    (folder / "link.png").symlink_to(paths[0].with_name("elsewhere.png"))  # dangling
    (folder / "good-link.png").symlink_to(paths[1])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.png"))
    os.mkfifo(folder / "notes.txt")
    try:
        result = _check_in_thread(folder, [folder / "notes.txt"])
    finally:
        sock.close()
    problems = {Path(p.where).name: p for p in result["error"].problems}
    assert "broken link" in problems["link.png"].message and problems["link.png"].severity == "error"
    assert "socket" in problems["s.png"].message and problems["s.png"].severity == "error"
    assert problems["notes.txt"].severity == "note"  # not named like an image: skipped
    assert "good-link.png" not in problems or problems["good-link.png"].severity != "error"


def test_image_load_rgb_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "a.png")
    with pytest.raises(ImageCheckError, match="FIFO"):
        load_rgb(tmp_path / "a.png")


# --- misleading messages and corrupt model files -------------------------------------------------

def _tiny_model_copy(dest: Path) -> Path:
    import shutil

    from dreambooth.models import detect_source, model_folder

    shutil.copytree(model_folder(detect_source("tiny-random")), dest)
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_message_run_without_final_says_so(tmp_path, subject_dir):
    from dreambooth.config import load_config, save_config
    from dreambooth.errors import ModelSourceError
    from dreambooth.generate import load_for_generation

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00003").mkdir(parents=True)
    (run / "checkpoints" / "step-00003" / "state.json").write_text("{}")
    save_config(load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}}), run / "config.yaml")
    with pytest.raises(ModelSourceError) as caught:  # generate and evaluate both load through here
        load_for_generation(run, device="cpu")
    report = caught.value.report()
    assert "no final model yet" in report and "--resume" in report and "step-00003" in report
    assert "not a diffusers model" not in report


def test_message_random_bytes_ckpt_is_corrupt_not_unsafe(tmp_path):
    from dreambooth.errors import ModelSourceError, UnsafeCheckpointError
    from dreambooth.formats.tensor_files import load_pickle_state_dict

    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(7, 256)) * 20)
    with pytest.raises(ModelSourceError) as caught:
        load_pickle_state_dict(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)
    assert "not a checkpoint file" in caught.value.report() and "arbitrary code" not in caught.value.report()


def test_message_unsafe_pickle_is_still_called_unsafe(tmp_path):
    import pickle

    from dreambooth.errors import UnsafeCheckpointError
    from dreambooth.formats.tensor_files import load_pickle_state_dict

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        load_pickle_state_dict(path)


def test_message_truncated_run_config_is_named_corrupt(tmp_path, subject_dir):
    from dreambooth.config import load_config, save_config
    from dreambooth.errors import ConfigError
    from dreambooth.training import train_events

    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}})
    for keep in (0.5, 0.93):  # mid-file (parses as a shorter mapping) and near the end (mid-value)
        run = tmp_path / f"run{keep}"
        run.mkdir()
        save_config(config, run / "config.yaml")
        (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # a run that got somewhere
        _truncate(run / "config.yaml", keep)
        with pytest.raises(ConfigError) as caught:
            next(train_events(config, run, resume=True))
        report = caught.value.report()
        assert "corrupt" in report and str(run / "config.yaml") in report and "changed configuration" not in report


@pytest.mark.parametrize("content", ["random", "unsafe", "lora"])
def test_message_model_check_refuses_what_the_loader_refuses(tmp_path, content):
    """The web app checks MODEL with models.detect_source; it must not pass a file the job refuses."""
    import pickle

    from safetensors.torch import save_file

    from dreambooth.errors import DreamboothError
    from dreambooth.models import detect_source
    from dreambooth.ui.settings import model_problems

    path = tmp_path / ("model.safetensors" if content == "lora" else "model.ckpt")
    if content == "random":
        path.write_bytes(bytes(range(256)) * 10)
    elif content == "unsafe":
        path.write_bytes(pickle.dumps({"w": Image.new("RGB", (1, 1))}, protocol=2))
    else:
        import torch

        save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(DreamboothError):
        detect_source(str(path))
    assert model_problems(str(path))


def test_message_corrupt_weight_file_in_a_diffusers_folder_is_named(tmp_path):
    from dreambooth.errors import ModelSourceError
    from dreambooth.models import load_components

    folder = _tiny_model_copy(tmp_path / "model")
    bad = [folder / "unet" / "diffusion_pytorch_model.safetensors",
           folder / "vae" / "diffusion_pytorch_model.safetensors"]
    for path in bad:
        _truncate(path)
    with pytest.raises(ModelSourceError) as caught:
        load_components(str(folder))
    assert sorted(p.where for p in caught.value.problems) == sorted(map(str, bad))
    assert "truncated or corrupt" in caught.value.report()
