"""Run a batch: every subject not yet finished, as Ray tasks with one GPU each, or in a local pool of
worker processes, one per visible GPU (or one on the CPU).

Each subject is an ordinary `training.train_events` run in its own run directory, so everything a
single run does holds here: a run dir with checkpoints resumes from the newest one, and a run whose
final/ exists (written atomically, last) is finished and skipped. A subject that fails, even by
crashing its process, is recorded with its error and the others go on; running the manifest again
retries it. Class images shared by subjects are made once: `priors` locks each cache key.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dreambooth.batch.manifest import Batch, Subject
from dreambooth.batch.status import BatchStatus
from dreambooth.errors import ConfigError, DreamboothError, Problem
from dreambooth.rundir import RunDir, RunLock, is_run_dir
from dreambooth.training import events as ev
from dreambooth.training import train, train_events

BACKENDS = ("auto", "ray", "local")
BATCH_LOCK = ".batch.lock"


def run_batch(batch: Batch, *, backend: str = "auto", workers: int | None = None, ray_address: str | None = None,
              stop: threading.Event | None = None, print_line=print) -> BatchStatus:
    """Train every unfinished subject of `batch`; return the final status (also in batch.json).

    backend: ray (connects to `ray_address` or RAY_ADDRESS when given, else starts a local Ray), local
    (`workers` processes, default one per visible GPU or one on the CPU), or auto: ray when installed.
    A set `stop` (Ctrl-C, SIGTERM) hands out no further subjects and stops the running ones at a checkpoint.
    """
    stop = stop or threading.Event()
    backend = pick_backend(backend)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}", [Problem("--workers", "must be at least 1, or left out for one "
                                                           "worker per visible GPU")])
    batch.folder.mkdir(parents=True, exist_ok=True)
    with RunLock.acquire(batch.folder / BATCH_LOCK):  # a second `batch` on this folder is refused, naming the PID
        status = BatchStatus(batch, backend, slots=1, print_line=print_line)
        jobs = []
        for position, subject in enumerate(batch.subjects):
            if is_run_dir(subject.output):
                status.set(position, "skipped")
            else:
                jobs.append((position, subject))
        if jobs and backend == "ray":
            _run_on_ray(jobs, status, stop, ray_address or os.environ.get("RAY_ADDRESS"))
        elif jobs:
            _run_locally(jobs, status, stop, local_devices(workers))
    return status


def pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", [Problem("--backend", f"use one of {', '.join(BACKENDS)}")])
    if backend != "auto":
        return backend
    try:
        import ray  # noqa: F401
    except ImportError:
        return "local"
    return "ray"


def run_subject(config, output: str, *, handle_signals: bool = False) -> dict:
    """Train one subject in this process to the end, resuming its run dir when it has one; returns
    {status: done|failed|stopped, seconds, error, final}. The subject's own failures are returned, not
    raised, so that a worker reports them and goes on."""
    began = time.perf_counter()
    resume = RunDir(Path(output)).config.exists()
    try:
        if handle_signals:  # a worker process of its own: Ctrl-C and SIGTERM end the run at a checkpoint
            last = train(config, output, resume=resume)
        else:
            last = None
            for last in train_events(config, output, resume=resume):
                pass
    except DreamboothError as e:
        return _result("failed", began, error=e.report())
    except Exception as e:  # noqa: BLE001 -- any crash of one subject is its failure, not the batch's
        traceback.print_exc()
        return _result("failed", began, error=f"{type(e).__name__}: {e}")
    if isinstance(last, ev.Finished):
        return _result("done", began, final=str(last.final))
    return _result("stopped", began)


def _result(status: str, began: float, *, error: str = "", final: str = "") -> dict:
    return {"status": status, "seconds": round(time.perf_counter() - began, 2), "error": error, "final": final}


# --- Ray ---------------------------------------------------------------------------------------------

def _run_on_ray(jobs: list[tuple[int, Subject]], status: BatchStatus, stop: threading.Event,
                address: str | None) -> None:
    """One Ray task per subject, one GPU each (one CPU on a cluster without GPUs); Ray places them."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray", [Problem("--backend ray", (
            "Ray is not installed: pip install 'dreambooth[ray]', or use --backend local"))]) from None
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address) if address else ray.init()
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        status.slots = max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(run_subject).options(**({"num_gpus": 1} if gpus else {"num_cpus": 1}))
        refs = {task.remote(subject.config, str(subject.output)): position for position, subject in jobs}
        for position in refs.values():
            status.set(position, "queued")
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                status.set(refs[ref], *_ray_outcome(ray, ref))
            if stop.is_set():
                for ref in waiting:  # a running task is interrupted; its run dir resumes next time
                    ray.cancel(ref)
                    status.set(refs[ref], "stopped")
                return
    finally:
        if owned:
            ray.shutdown()


def _ray_outcome(ray, ref) -> tuple[str, dict]:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as e:  # the task's worker died (killed, out of host memory, node lost)
        result = {"status": "failed", "error": str(e).strip().splitlines()[-1]}
    return result["status"], result


# --- local worker pool -------------------------------------------------------------------------------

def local_devices(workers: int | None = None) -> list[str | None]:
    """A CUDA_VISIBLE_DEVICES value per worker: one worker per visible GPU, or one on the CPU (None);
    `workers` sets the count (several workers share a GPU in turn)."""
    import torch

    if torch.cuda.is_available():
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = (visible or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]
    else:
        ids = [None]
    return [ids[i % len(ids)] for i in range(workers or len(ids))]


def _run_locally(jobs: list[tuple[int, Subject]], status: BatchStatus, stop: threading.Event,
                 devices: list[str | None]) -> None:
    """A thread per worker slot hands subjects, in order, to fresh worker processes (spawned, so CUDA
    starts clean in each with its own CUDA_VISIBLE_DEVICES); a crashed process fails only its subject."""
    status.slots = len(devices)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for device in devices:
        free.put(device)
    logs = status.batch.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # CPU workers split the cores: each torch would otherwise start a thread per core
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if None in devices else None

    def one(position: int, subject: Subject) -> None:
        device = free.get()
        try:
            if stop.is_set():
                return  # stays pending; the next invocation runs it
            status.set(position, "running")
            result = _run_process(subject, device, threads, logs / f"{subject.index:02d}-{subject.name}.log", stop)
            status.set(position, result["status"], result)
        finally:
            free.put(device)

    with ThreadPoolExecutor(len(devices), thread_name_prefix="batch-worker") as pool:
        for future in [pool.submit(one, position, subject) for position, subject in jobs]:
            future.result()


def _run_process(subject: Subject, device: str | None, threads: int | None, log: Path,
                 stop: threading.Event) -> dict:
    began = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(subject.config, str(subject.output), device, threads,
                                                         str(log), sender), name=f"dreambooth-batch-{subject.name}")
    process.start()
    sender.close()
    result, signalled = None, False
    while result is None and (process.is_alive() or receiver.poll()):
        if receiver.poll(0.5):
            try:
                result = receiver.recv()
            except EOFError:  # the process ended without a word
                break
        if stop.is_set() and not signalled:
            process.terminate()  # SIGTERM: the run saves a checkpoint and reports "stopped"
            signalled = True
    process.join()
    if result is None:
        result = _result("failed", began, error=f"the worker process exited with code {process.exitcode} "
                         f"before reporting; see {log}")
    return {**result, "seconds": round(time.perf_counter() - began, 2)}  # with the worker's start-up


def _worker_main(config, output: str, device: str | None, threads: int | None, log: str, sender) -> None:
    """The worker process: its GPU (or its share of the CPU cores), its log file as stdout and stderr,
    one subject."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sender.send(run_subject(config, output, handle_signals=True))
    sender.close()
