"""Training jobs: a queue that runs one training at a time and survives page reloads and restarts.

Each job lives in `jobs/<id>/` of the workspace: `job.json` (its state, rewritten atomically on
every event), `images/` (the frozen photo set) and `run/` (the library's run directory). The
browser only ever reads this state, so a reload shows the same thing; after a server restart a job
that was running is marked interrupted, and resuming it continues from its last checkpoint with
`train_events(..., resume=True)`.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dreambooth import config as run_config  # a module reference: tests replace build_config
from dreambooth.atomic import write_json
from dreambooth.errors import BadRequest, DreamboothError, NotFound
from dreambooth.training import events as ev
from dreambooth.training.loop import train_events
from dreambooth.ui.uploads import ID_PATTERN, new_id

ACTIVE = ("queued", "running")
RESUMABLE = ("stopped", "interrupted", "failed")
TrainFn = Callable[..., Iterator]  # train_events' signature, yielding its events


@dataclass
class Job:
    id: str
    name: str
    form: dict  # what the user chose, shown again on the page
    config: dict  # the resolved RunConfig as a dict (`build_config` rebuilds it)
    status: str = "queued"  # queued, running, finished, stopped, cancelled, failed, interrupted
    phase: str = "waiting"  # waiting, loading, class images, caching latents, training, validation images, done
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    class_done: int = 0
    class_total: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    step_seconds: float | None = None  # smoothed time of one step, outside slow phases
    phase_total: int = 0  # images the current phase makes, when known
    phase_started: float | None = None
    samples: list[str] = field(default_factory=list)  # relative to run/
    checkpoint: str | None = None  # relative to run/
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    resume_next: bool = False  # the next run continues from run/'s last checkpoint
    failed_phase: str | None = None  # where a failed job stopped ("loading": the model did not load)
    generated: list[dict] = field(default_factory=list)  # {"file", "prompt", "seed", "batch"}, in generated/
    scores: list[dict] = field(default_factory=list)  # checkpoint scores: step, fidelity, prompt_fidelity, drift
    selected: dict | None = None  # {"step", "reason"}: the scored checkpoint that final/ holds


class JobStore:
    """Reads and writes `jobs/<id>/job.json`; ids are checked so none can name another path."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.versions: dict[str, int] = {}

    def folder(self, job_id: str) -> Path:
        if not ID_PATTERN.match(job_id or ""):
            raise NotFound("no such job")
        return self.root / job_id

    def save(self, job: Job) -> None:
        self.versions[job.id] = self.versions.get(job.id, 0) + 1  # what the progress streams watch
        folder = self.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "job.json", asdict(job))  # atomic: a crash never leaves half a file

    def load_all(self) -> list[Job]:
        known = set(Job.__dataclass_fields__)
        jobs = []
        for path in sorted(self.root.glob("*/job.json")):
            data = json.loads(path.read_text())
            jobs.append(Job(**{k: v for k, v in data.items() if k in known}))
        return sorted(jobs, key=lambda j: j.created)


def apply_event(job: Job, event, run_dir: Path) -> None:
    """Fold one training event into the job's visible state."""
    if isinstance(event, ev.Notice):
        job.notices.append(event.message)
    elif isinstance(event, ev.ClassImagesProgress):
        job.phase, job.class_done, job.class_total = "class images", event.done, event.total
    elif isinstance(event, ev.Phase):
        job.phase, job.phase_total, job.phase_started = event.name, event.total, time.time()
    elif isinstance(event, ev.Started):
        job.phase, job.step, job.total_steps = "training", event.start_step, event.total_steps
    elif isinstance(event, ev.StepDone):
        if job.phase == "training":  # a step that followed a slow phase also timed that phase
            job.step_seconds = smooth(job.step_seconds, event.seconds_per_step)
        job.phase, job.step, job.total_steps, job.loss = "training", event.step, event.total_steps, event.loss
        job.eta_seconds = None if job.step_seconds is None else (event.total_steps - event.step) * job.step_seconds
    elif isinstance(event, ev.SampleWritten):
        job.samples.append(_relative(event.path, run_dir))
    elif isinstance(event, ev.CheckpointSaved):
        job.checkpoint = _relative(event.path, run_dir)
    elif isinstance(event, ev.Evaluated):
        row = {k: event.scores.get(k) for k in ("fidelity", "prompt_fidelity", "drift")}
        job.scores = [r for r in job.scores if r["step"] != event.step] + [{"step": event.step, **row}]
    elif isinstance(event, ev.Selected):
        job.selected = {"step": event.step, "reason": event.reason}
    elif isinstance(event, ev.Stopped):
        job.status, job.step, job.checkpoint = "stopped", event.step, _relative(event.checkpoint, run_dir)
        job.eta_seconds, job.resume_next = None, True
    elif isinstance(event, ev.Finished):
        job.status, job.phase, job.step, job.eta_seconds = "finished", "done", event.step, 0.0


def smooth(previous: float | None, sample: float, weight: float = 0.2) -> float:
    """Exponential moving average of the step time, so the time left does not jump with each step."""
    return sample if previous is None else (1 - weight) * previous + weight * sample


def resumable(job: Job) -> bool:
    """Stopped, interrupted and failed jobs resume, except a failure to load the model (it would repeat)."""
    return job.status in RESUMABLE and not (job.status == "failed" and job.failed_phase == "loading")


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return Path(path).name


class JobRunner:
    """One worker thread, one training at a time, FIFO; every change is persisted before it is shown."""

    def __init__(self, workspace: Path, train_fn: TrainFn | None = None):
        self.store = JobStore(Path(workspace) / "jobs")
        self._train_fn = train_fn or train_events
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._stops: dict[str, threading.Event] = {}
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "JobRunner":
        """Load saved jobs (a job that was running when the server died is now interrupted), start work."""
        with self._lock:
            for job in self.store.load_all():
                if job.status == "running":
                    job.status, job.eta_seconds = "interrupted", None
                    job.resume_next = (self.run_dir(job.id) / "config.yaml").exists()
                    job.notices.append("the server stopped while this job ran; resume continues from "
                                       "its last checkpoint")
                    self.store.save(job)
                self._jobs[job.id] = job
                if job.status == "queued":
                    self._queue.append(job.id)
        self._thread = threading.Thread(target=self._work, name="dreambooth-ui-jobs", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask the running job to stop at its next step (it saves a checkpoint), then wait for it."""
        with self._lock:
            self._closing = True
            for stop in self._stops.values():
                stop.set()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- queries ---------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.store.folder(job_id)

    def run_dir(self, job_id: str) -> Path:
        return self.folder(job_id) / "run"

    def images_dir(self, job_id: str) -> Path:
        return self.folder(job_id) / "images"

    def get(self, job_id: str) -> Job:
        with self._lock:
            return Job(**json.loads(json.dumps(asdict(self._job(job_id)))))  # a copy: no torn reads

    def list(self) -> list[Job]:
        with self._lock:
            return [self.get(job_id) for job_id in self._jobs]

    @property
    def closing(self) -> bool:
        return self._closing

    def version(self, job_id: str) -> int:
        """Grows with every saved change of the job (0 if never saved by this runner)."""
        return self.store.versions.get(job_id, 0)

    def queue_position(self, job_id: str) -> int | None:
        with self._lock:
            return self._queue.index(job_id) + 1 if job_id in self._queue else None

    # --- commands --------------------------------------------------------------------------------
    def submit(self, name: str, form: dict, prepare: Callable[[Path], dict]) -> Job:
        """Queue a new job; `prepare(images_dir)` fills the job's own photo folder and returns the config."""
        job_id = new_id()
        config = prepare(self.images_dir(job_id))
        return self._enqueue(Job(job_id, name, form, config))

    def cancel(self, job_id: str) -> Job:
        """Queued: dropped. Running: the stop flag is set; the loop saves a checkpoint and yields Stopped."""
        with self._lock:
            job = self._job(job_id)
            if job.id in self._queue:
                self._queue.remove(job.id)
                job.status, job.ended = "cancelled", time.time()
                self.store.save(job)
            elif job.status == "running" and job.id in self._stops:
                self._stops[job.id].set()
                job.notices.append("cancel requested: saving a checkpoint after the current step"
                                   if job.phase in ("training", "validation images") else "cancel requested: stopping")
                self.store.save(job)
            return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        with self._lock:
            job = self._job(job_id)
            if not resumable(job):
                raise BadRequest(f"this {job.status} job cannot be resumed" + (
                    ": its model did not load; start a new training with another model"
                    if job.failed_phase == "loading" else ""))
            job.status, job.error, job.ended, job.failed_phase = "queued", None, None, None
            job.resume_next = (self.run_dir(job.id) / "config.yaml").exists()
            return self._enqueue(job)

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply `change` to a job and persist it (used for the generated-images list)."""
        with self._lock:
            change(self._job(job_id))
            self.store.save(self._job(job_id))
            return self.get(job_id)

    def _job(self, job_id: str) -> Job:
        """The live job (callers hold the lock)."""
        if job_id not in self._jobs:
            raise NotFound("no such job")
        return self._jobs[job_id]

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self.store.save(job)
            self._wake.notify_all()
            return self.get(job.id)

    # --- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job = self._jobs[self._queue.pop(0)]
                stop = self._stops[job.id] = threading.Event()
                job.status, job.phase, job.started = "running", "loading", time.time()
                self.store.save(job)
            try:
                self._train(job, stop)
            finally:
                with self._lock:
                    self._stops.pop(job.id, None)

    def _train(self, job: Job, stop: threading.Event) -> None:
        run_dir = self.run_dir(job.id)
        try:
            config = run_config.build_config(job.config)
            resume = job.resume_next
            events = self._train_fn(config, run_dir, resume=resume, overwrite=not resume, stop=stop)
            for event in events:
                with self._lock:
                    apply_event(job, event, run_dir)
                    self.store.save(job)
            with self._lock:
                if job.status == "running":  # the generator ended without Finished or Stopped
                    job.status, job.error = "failed", "training ended without finishing"
        except DreamboothError as err:
            self._fail(job, err.report())
        except Exception as err:  # noqa: BLE001 - any crash must reach the page, not kill the worker
            traceback.print_exc()
            self._fail(job, f"{type(err).__name__}: {err}")
        with self._lock:
            job.ended = time.time()
            self.store.save(job)

    def _fail(self, job: Job, message: str) -> None:
        with self._lock:
            job.status, job.error, job.eta_seconds, job.failed_phase = "failed", message, None, job.phase
            job.resume_next = (self.run_dir(job.id) / "config.yaml").exists()
