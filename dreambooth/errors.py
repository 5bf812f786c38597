"""Error types that carry every problem found, so the user gets one clear report.

A `Problem` names where it is (a file path or a config key), what is wrong and what to do.
Checks collect problems into a list and raise once at the end (torchtune's `config.validate`
style), so a user with three bad photos hears about all three at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Problem:
    where: str  # file path, config key or value the problem is about
    message: str  # what is wrong and what to do about it
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


class DreamboothError(Exception):
    """Base of all errors the tool raises on bad input; the CLI prints it and exits 2."""

    def __init__(self, summary: str, problems: Iterable[Problem] = ()):
        self.summary = summary
        self.problems = list(problems)
        super().__init__(self.report())

    def report(self) -> str:
        lines = [self.summary]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(DreamboothError):
    """One or more config fields are invalid; every bad field is listed."""


class ImageCheckError(DreamboothError):
    """The subject images cannot be used; every bad file is listed."""


class ModelSourceError(DreamboothError):
    """MODEL is not a diffusers folder, single file, hub id or built-in name we can load."""


class UnsafeCheckpointError(DreamboothError):
    """A pickle checkpoint that cannot be loaded without running arbitrary code."""


class RunDirError(DreamboothError):
    """The run directory is missing, incomplete, or would be overwritten."""


class TrainingDiverged(DreamboothError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class OutOfMemory(DreamboothError):
    """A phase of training ran out of device memory; names the phase, its peak, the device's total
    and what to change. The run directory and its checkpoints are kept."""

    def __init__(self, summary: str, problems: Iterable[Problem] = (), *, phase: str = "",
                 peak_mb: float = 0.0, total_mb: float = 0.0):
        self.phase, self.peak_mb, self.total_mb = phase, peak_mb, total_mb
        super().__init__(summary, problems)


class BadRequest(DreamboothError):
    """A web app request the user can fix (a bad number, an unusable upload); answered as 400."""


class NotFound(DreamboothError):
    """A job, photo set, photo or file asked for by id or name that does not exist; answered as 404."""


def raise_if_errors(summary: str, problems: list[Problem], error_type: type[DreamboothError]) -> None:
    """Raise `error_type` with all problems when any of them is an error."""
    if any(p.severity == "error" for p in problems):
        raise error_type(summary, problems)
