"""Hostile conditions around files: each case gets a named message, exit code 2, and no partial file.

Export cases (test_export_*): the target exists, the folder is read-only, the disk fills up, Ctrl-C
or SIGTERM arrives mid-write, and temporaries of an export killed outright are pruned later.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_formats import _train

from dreambooth.cli import main


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, subject_dir):
    return _train(tmp_path_factory, subject_dir, "full", "tiny", [])


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
