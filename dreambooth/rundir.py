"""The run directory: what a training run writes, and the rule that nothing is overwritten by accident.

    RUN_DIR/
      config.yaml              resolved config, everything needed to rerun
      log.jsonl                one JSON line per logged step
      samples/step-NNNNN.png   validation grids
      checkpoints/step-NNNNN/  resumable state (last K kept)
      final/                   trained model: diffusers folder, or LoRA weights + base reference
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import Problem, RunDirError

RUN_INFO = "dreambooth.json"  # in final/: what the model is and how to use it


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

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the folders; refuse to touch an existing run unless told to resume or overwrite."""
        if resume and overwrite:
            raise RunDirError("choose one of --resume and --overwrite", [Problem(str(self.root), "both given")])
        exists = self.root.exists() and any(self.root.iterdir())
        if exists and not (resume or overwrite):
            raise RunDirError(
                f"{self.root} already holds a run",
                [Problem(str(self.root), "not empty; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --output")],
            )
        if resume and not self.config.exists():
            raise RunDirError(f"nothing to resume in {self.root}",
                              [Problem(str(self.config), "missing; start the run without --resume")])
        if exists and overwrite:
            shutil.rmtree(self.root)
        for d in (self.root, self.samples, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

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


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").exists() and (Path(path) / "final").is_dir()
