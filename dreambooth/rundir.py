"""The run directory: what a training run writes, and the rule that nothing is overwritten by accident.

    RUN_DIR/
      .dreambooth-run          marker: this folder was created by a training run (--overwrite checks it)
      .lock                    held (flock) by the process that trains in it; holds its PID
      config.yaml              resolved config, everything needed to rerun
      log.jsonl                one JSON line per logged step
      samples/step-NNNNN.png   validation grids
      checkpoints/step-NNNNN/  resumable state (last K kept)
      final/                   trained model: diffusers folder, or LoRA weights + base reference
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import Problem, RunDirError

RUN_INFO = "dreambooth.json"  # in final/: what the model is and how to use it
MARKER = ".dreambooth-run"
LOCK = ".lock"
# Everything a run writes at its top level; --overwrite deletes these and nothing else.
RUN_ENTRIES = {MARKER, LOCK, "config.yaml", "log.jsonl", "samples", "checkpoints", "final", "export", "scores.png"}
RUN_PREFIXES = (".final.tmp-", ".final-")  # temporaries of an interrupted final/ save (new, older)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def check_target(self, images: str | Path | None = None) -> None:
        """Refuse an output that is a file or that would mix the run with the subject photos."""
        problems = []
        if self.root.exists() and not self.root.is_dir():
            problems.append(Problem(str(self.root), "is a file, not a folder; choose another --output"))
        if images:
            out, photos = self.root.resolve(), Path(images).resolve()
            if out == photos or out in photos.parents or photos in out.parents:
                problems.append(Problem(str(self.root), f"overlaps the images folder {images}: a run folder must "
                                        "neither be, contain nor sit inside the photos; choose another --output"))
        if problems:
            raise RunDirError(f"cannot use {self.root} as the run directory", problems)

    def started(self) -> bool:
        """Whether training got anywhere: a checkpoint, a logged step or a final model exists."""
        if self.final.exists() or (self.checkpoints.is_dir() and any(self.checkpoints.glob("step-*"))):
            return True
        try:
            return any("step" in r for r in self.read_log())
        except ValueError:  # a torn log line still means steps ran
            return True

    def is_own(self) -> bool:
        """A folder this tool made for a run: it has the marker, or (older runs) a config.yaml and
        nothing but the run's own entries."""
        if (self.root / MARKER).exists():
            return True
        return self.config.exists() and all(_is_run_entry(p.name) for p in self.root.iterdir())

    def prepare(self, *, resume: bool, overwrite: bool) -> "RunLock":
        """Create (or reuse) the folders and lock the run; refuse to touch an existing run unless told
        to resume or overwrite. A run that never reached its first step is simply started again.
        Returns the held lock: keep it for as long as the run writes here."""
        if resume and overwrite:
            raise RunDirError("choose one of --resume and --overwrite", [Problem(str(self.root), "both given")])
        self.check_target()
        if self.root.exists():
            self._refusal(resume=resume, overwrite=overwrite)  # before the lock file touches the folder
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(self.root / LOCK)
        except PermissionError as e:
            raise RunDirError(f"cannot write to {self.root}", [Problem(str(self.root), f"{e.strerror}; choose "
                                                                      "a folder you can write to")]) from e
        try:
            if self._refusal(resume=resume, overwrite=overwrite):
                self._clear()
            (self.root / MARKER).write_text(json.dumps({"format": "dreambooth-run/1"}))
            for d in (self.samples, self.checkpoints):
                d.mkdir(exist_ok=True)
        except BaseException:
            lock.release()
            raise
        return lock

    def _refusal(self, *, resume: bool, overwrite: bool) -> bool:
        """Raise when the folder must not be used as asked; return whether old run files must go."""
        if resume and not self.config.exists():
            raise RunDirError(f"nothing to resume in {self.root}",
                              [Problem(str(self.config), "missing; start the run without --resume")])
        if resume and self.started():
            return False
        if not any(p.name not in (LOCK, MARKER) for p in self.root.iterdir()):
            return False
        if not self.is_own():
            raise RunDirError(f"{self.root} is not a run directory", [Problem(str(self.root), (
                f"not empty and has no {MARKER} marker, so nothing in it is deleted and --resume and "
                "--overwrite do not apply; choose an empty or new --output"))])
        if self.started() and not overwrite:
            raise RunDirError(f"{self.root} already holds a run", [Problem(
                str(self.root), "not empty; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --output")])
        return True

    def _clear(self) -> None:
        """Delete the run's own files (a run that never trained is simply started again); anything
        else a user put in the folder stays."""
        for path in self.root.iterdir():
            if _is_run_entry(path.name) and path.name not in (LOCK, MARKER):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def append_log(self, record: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop log lines past the checkpoint so the log matches the restored state."""
        kept = [r for r in self.read_log() if r.get("step", 0) <= after_step]
        self.log.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def run_info(self) -> dict:
        path = self.final / RUN_INFO
        if not path.exists():
            raise RunDirError(f"{self.root} has no finished model",
                              [Problem(str(path), "missing; finish or resume the training run first")])
        return json.loads(path.read_text())


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or name.startswith(RUN_PREFIXES)


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock, so two processes never train in one run directory.

    The kernel drops the lock when the process ends, however it ends, so a killed run never
    leaves a stale lock behind. The file holds the holder's PID for the refusal message.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: Path) -> "RunLock":
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{path.parent} is in use by another training process", [Problem(
                str(path.parent), f"locked by PID {holder}; wait for it to finish or stop it, "
                "then run again")]) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").exists() and (Path(path) / "final").is_dir()
