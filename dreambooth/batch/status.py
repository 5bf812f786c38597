"""The state of a batch: one status per subject, progress lines, batch.json and the summary table.

Statuses: `pending` (not handed to a worker yet), `queued` (handed to Ray, which starts it when a GPU
is free), `running`, `done`, `skipped` (finished by an earlier invocation: its final/ exists),
`failed` (with the error) and `stopped` (interrupted; the next invocation resumes it).
The time left is the mean duration of the runs finished so far, times the runs left, divided by
the runs that execute at once.
"""
from __future__ import annotations

import math
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from dreambooth.atomic import write_json
from dreambooth.batch.manifest import Batch

STATUS_FILE = "batch.json"
LEFT = ("pending", "queued", "running")


class BatchStatus:
    """Thread-safe: the local pool's threads report through it. Each change rewrites batch.json
    atomically and prints one line."""

    def __init__(self, batch: Batch, backend: str, slots: int, print_line: Callable[[str], None] = print):
        self.batch, self.backend, self.slots, self.print_line = batch, backend, max(1, slots), print_line
        self.started = _now()
        self.rows = [{"index": s.index, "name": s.name, "output": str(s.output), "status": "pending",
                      "seconds": None, "error": "", "final": ""} for s in batch.subjects]
        self._lock = threading.Lock()

    def set(self, position: int, status: str, result: dict | None = None) -> None:
        """Subject at `position` (in manifest order) is now `status`; `result` from `run_subject`."""
        with self._lock:
            row = self.rows[position]
            row["status"] = status
            for key in ("seconds", "error", "final"):
                if result and result.get(key) is not None:
                    row[key] = result[key]
            self._write()
            if status not in ("pending", "queued"):
                detail = f": {brief(row['error'])}" if row["error"] and status == "failed" else ""
                self.print_line(f"[{self.progress()}] {row['name']} {status}{detail}")

    def progress(self) -> str:
        counts = self.counts()
        parts = [f"{counts['done'] + counts['skipped']}/{len(self.rows)} done"]
        parts += [f"{counts[s]} {s}" for s in ("running", "queued", "failed", "stopped") if counts[s]]
        eta = self.seconds_left()
        if counts["pending"] + counts["queued"] + counts["running"]:
            parts.append("time left unknown until a run finishes" if eta is None else f"about {_duration(eta)} left")
        return ", ".join(parts)

    def counts(self) -> dict[str, int]:
        names = ("pending", "queued", "running", "done", "skipped", "failed", "stopped")
        return {s: sum(r["status"] == s for r in self.rows) for s in names}

    def seconds_left(self) -> float | None:
        durations = [r["seconds"] for r in self.rows if r["status"] == "done" and r["seconds"]]
        if not durations:
            return None
        left = sum(r["status"] in LEFT for r in self.rows)
        return sum(durations) / len(durations) * math.ceil(left / self.slots)

    def summary(self) -> str:
        """The final table: one line per subject."""
        header = ("subject", "status", "time", "run directory / error")
        lines = [(r["name"], r["status"], _duration(r["seconds"]) if r["seconds"] else "-",
                  brief(r["error"]) if r["status"] == "failed" and r["error"] else r["output"])
                 for r in self.rows]
        widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(3)]
        return "\n".join("  ".join([*(str(c).ljust(w) for c, w in zip(row[:3], widths)), row[3]])
                         for row in [header, *lines])

    def _write(self) -> None:
        counts = self.counts()
        self.batch.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.batch.folder / STATUS_FILE, {
            "format": "dreambooth-batch/1", "manifest": str(Path(self.batch.manifest).resolve()),
            "backend": self.backend, "slots": self.slots, "started": self.started, "updated": _now(),
            "active": any(counts[s] for s in LEFT), "complete": counts["done"] + counts["skipped"] == len(self.rows),
            "counts": counts,
            "seconds_left": self.seconds_left(), "subjects": self.rows,
        })


def brief(error: str) -> str:
    """One line of an error report: its first listed problem (which names the file or key), else its summary."""
    lines = [line.strip() for line in error.strip().splitlines()]
    listed = [line[2:] for line in lines if line.startswith("- ")]
    return (listed or lines or [""])[0]


def status_path(folder: Path) -> Path:
    return Path(folder) / STATUS_FILE


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"
