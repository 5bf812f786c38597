"""The DreamBooth training loop: one readable generator of progress events, which the CLI
and the web app render (the loop makes no UI calls).

    for event in train_events(config, "runs/dog"):
        print(event)

Order of work: validate config and photos (no weights loaded yet), prepare the run directory, load
the base model, make or reuse class images, then train with the prior-preservation loss.

Under a launcher (`accelerate launch -m dreambooth train ...`) every process runs this generator:
they train data-parallel on their rows of each global batch (DDP), and rank 0 alone writes the run
directory (lock, config, log, checkpoints, samples, final/); the others wait where they must.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Generator, Iterator, Protocol

import torch

from dreambooth.config import RunConfig, read_run_config, save_config
from dreambooth.data.images import check_images
from dreambooth.data.masks import check_masks
from dreambooth.errors import ConfigError, Problem, TrainingDiverged
from dreambooth.planning import read_card
from dreambooth.ranks import Ranks, launched_ranks
from dreambooth.rundir import RunDir
from dreambooth.sampling import pick_device
from dreambooth.training import events as ev
from dreambooth.training.checkpoints import checkpoint_folder, newest_intact, save_checkpoint, weights_are_finite
from dreambooth.training.fast import FastStep, LossReadout
from dreambooth.training.losses import LossParts
from dreambooth.training.memory import PhaseMeter, oom_advice, peak_now, release_memory
from dreambooth.training.outputs import add_memory_summary, save_final, write_samples
from dreambooth.training.preflight import check_before_loading, resume_config, with_local_model_resolved
from dreambooth.training.prepare import prefer_expandable_segments, prepare
from dreambooth.training.scaling import Scaling, divergence
from dreambooth.training.setup import count_trainable
from dreambooth.training.state import TrainState
from dreambooth.training.step import PlainStep


def train_events(config: RunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                 stop: threading.Event | None = None) -> Iterator[ev.Event]:
    """Run (or resume) a DreamBooth training and yield progress events; `stop` ends it cleanly.

    The run directory is locked while the generator runs; a run that never reached step 1 is started
    again (also with `resume`), since nothing of it could be continued."""
    prefer_expandable_segments()

    run = RunDir(Path(output))
    run.check_target()
    config = with_local_model_resolved(config)
    saved = resume and run.config.exists()
    fresh_resume = saved and not run.started()
    if saved and not fresh_resume:
        config = resume_config(with_local_model_resolved(read_run_config(run.config)), config)
    run.check_target(config.data.images)
    check_before_loading(config)
    ranks = launched_ranks(pick_device(config.train.device))
    check_batch_split(config, ranks)
    report = check_images(config.data.images, config.data.resolution, max_pixels=config.data.max_pixels)
    check_masks(report.images, config.data.masks, max_pixels=config.data.max_pixels)
    ranks.wait()  # every process has read what it needs of the run directory before rank 0 changes it
    with run.prepare(resume=resume, overwrite=overwrite) if ranks.main else contextlib.nullcontext():
        if ranks.main:  # the lock is held until the generator ends
            save_config(config, run.config)
        ranks.wait()  # the run directory exists for every process
        if fresh_resume:
            yield ev.Notice(f"{run.root} never reached step 1: starting it again with the given settings")
        for problem in report.problems:
            yield ev.Notice(str(problem))
        yield from _train(config, run, report, resume and not fresh_resume, stop, ranks)
        ranks.wait()  # no process ends before rank 0 has written everything


def check_batch_split(config: RunConfig, ranks: Ranks) -> None:
    """`train.batch_size` is the global batch: several processes must split it evenly."""
    size = config.train.batch_size
    if size % ranks.count:
        raise ConfigError(f"train.batch_size={size} cannot be split over {ranks.count} processes", [Problem(
            "train.batch_size", f"is the global batch (subject rows, and as many class rows); use a multiple "
            f"of {ranks.count}, e.g. train.batch_size={ranks.count * max(1, size // ranks.count)}, or launch "
            "fewer processes")])


def _train(config: RunConfig, run: RunDir, report, resume: bool, stop, ranks: Ranks) -> Iterator[ev.Event]:
    """Prepare (the run directory is prepared and locked), then run the steps."""
    log = run.append_log if ranks.main else None
    meter = PhaseMeter(log, advice=lambda phase: oom_advice(phase, config, run.checkpoints, _card()))
    try:
        state = yield from prepare(config, run, report, resume, stop, meter, ranks)
    except torch.OutOfMemoryError as e:  # outside a measured phase: moving the models to the device
        raise meter.unmeasured_out_of_memory("model setup", e) from None
    if state is None:  # stopped before step 1
        return
    yield ev.Started(state.start, config.train.steps, count_trainable(state.modules), str(state.device),
                     state.mixed_precision)
    step_fn = FastStep(state) if state.fast else PlainStep(state)
    yield from run_steps(state, step_fn, stop)


class StepFunction(Protocol):
    """A training step in two halves: `backward(step)` queues forward and backward and returns the
    losses (tensors); `update()` applies them to the weights (`step.PlainStep`, `fast.FastStep`)."""

    def backward(self, step: int) -> LossParts: ...

    def update(self) -> Scaling | None: ...


def run_steps(state: TrainState, step_fn: StepFunction, stop: threading.Event | None) -> Iterator[ev.Event]:
    """Steps from `state.start`, logging, samples and checkpoints; ends with Finished or Stopped.

    With `state.lag` > 0 the losses of a step are read (and its StepDone yielded) once the next
    step's backward is queued, before its update: a stop asked on seeing step k then still ends at
    step k, as with lag 0. Samples, scoring, checkpoints and the end see every step reported first.
    """
    began = time.perf_counter()
    with state.meter.phase("training steps", state.device):  # samples and scoring are measured apart
        finished = yield from _steps(state, step_fn, stop, began)
    if finished:
        release_training_memory(state, step_fn)
        yield from _finish(state, began)


def release_training_memory(state: TrainState, step_fn) -> None:
    """After the last step nothing needs the optimizer's moments, the gradients or the fast step's
    CUDA graph (its private pool keeps a step's activations): hand them back, so the final save and
    the last samples fit in what the models alone take. A 12 GB SD 1.5 full fine-tune ran out of
    memory in its final save without this."""
    release = getattr(step_fn, "release", None)
    if release is not None:
        release()
    state.optimizer.state.clear()
    for group in state.optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    for module in state.modules.values():
        for p in module.parameters():
            p.grad = None
    for flat in (state.flats or {}).values():
        flat.release()
    release_memory(state.device)


def _steps(state: TrainState, step_fn: StepFunction, stop, began: float) -> Generator[ev.Event, None, bool]:
    """The steps of `run_steps`; returns False when a stop ended them (after its checkpoint)."""
    config, scoring, modules = state.config, state.scoring, state.modules
    out = config.output
    clock = {"began": began, "last": began}
    readout = LossReadout(state.lag)
    for step in range(state.start, config.train.steps):
        parts = step_fn.backward(step)
        # with a lag, the previous step is reported here, while this one runs on the device
        reported = yield from _report_steps(readout.take(flush=True), state, clock)
        if reported and _stop_asked(state, stop):  # this step's gradients are dropped
            yield from _stop(state, reported)
            return False
        scaling = step_fn.update()
        if state.ema is not None and (scaling is None or not scaling.skipped):  # a skipped step changed nothing
            state.ema.update()
        done = step + 1
        readout.push(done, parts, float(state.lr_schedule.get_last_lr()[0]), scaling)  # a tensor for torchao
        yield from _report_steps(readout.take(flush=_acts_after(done, config, scoring, stop)), state, clock)
        if wants_samples(config) and out.sample_every and done % out.sample_every == 0 and done < config.train.steps:
            yield from _samples(state, done)
        if scoring is not None and scoring.due(done):
            with state.meter.phase("checkpoint scoring", state.device), state.parking.back(), state.averaged():
                row = scoring.score(done, modules)  # the weight average, when kept, is what is scored
            yield ev.Evaluated(done, row)
        stopping = _stop_asked(state, stop)
        yield from _report_steps(readout.take(flush=stopping), state, clock)
        if stopping:
            yield from _stop(state, done)
            return False
        if out.checkpoint_every and done % out.checkpoint_every == 0:
            yield from _checkpoint(state, done)
    return True


def _stop_asked(state: TrainState, stop) -> bool:
    """Whether a stop was asked (of any process: all of them stop at the same step)."""
    return state.ranks.any(stop is not None and stop.is_set())


def _checkpoint(state: TrainState, done: int) -> Iterator[ev.Event]:
    """Save the weights after step `done` (refusing non-finite ones; rank 0 writes, every process
    holds the same weights); returns the folder."""
    if not weights_are_finite(state.modules):  # a finite loss, then an update that overflowed
        raise _diverged("the weights became NaN or infinite", done, state.run)
    path = checkpoint_folder(state.run.checkpoints, done)
    if state.ranks.main:
        save_checkpoint(state.run.checkpoints, done, state.modules, state.optimizer, state.lr_schedule,
                        state.config.output.keep_checkpoints, state.scaler, state.ema)
    yield ev.CheckpointSaved(done, path)
    return path


def _stop(state: TrainState, done: int) -> Iterator[ev.Event]:
    path = yield from _checkpoint(state, done)
    yield ev.Stopped(done, path)


def _finish(state: TrainState, began: float) -> Iterator[ev.Event]:
    """After the last step: choose a checkpoint (when scored), write final/, then the last samples
    (rank 0; the other processes only report the end)."""
    config, scoring, main = state.config, state.scoring, state.ranks.main
    if state.ema is not None:  # training is over: the weight average is the model from here on
        state.ema.copy_to()
        state.ema = None
    with state.meter.phase("save", state.device):
        choice = scoring.finish(state.modules) if scoring is not None else None
        if choice is not None:
            yield ev.Selected(*choice)
        final = state.run.final
        if main:  # first: nothing optional can lose it
            final = save_final(state.components, config, state.run, selection=choice)
    if scoring is not None:
        scoring.cleanup()
    if wants_samples(config):
        yield from _samples(state, config.train.steps)
    memory = state.meter.summary()
    if main:
        add_memory_summary(final, memory)
    yield ev.Finished(config.train.steps, final, time.perf_counter() - began, memory)


def _samples(state: TrainState, step: int) -> Iterator[ev.Event]:
    """A validation grid (rank 0 alone; the others meet it at the next step's gradient all-reduce)."""
    if not state.ranks.main:
        return
    out = state.config.output
    yield ev.Phase("validation images", len(out.sample_prompts) * out.sample_images)
    with state.meter.phase("validation samples", state.device), state.parking.back(), state.averaged():
        path = write_samples(state.components, state.config, state.run, step)
    yield ev.SampleWritten(step, path)


def wants_samples(config: RunConfig) -> bool:
    """Validation grids are written unless output.sample_images (or the prompt list) is 0."""
    return config.output.sample_images > 0 and bool(config.output.sample_prompts)


def _acts_after(done: int, config: RunConfig, scoring, stop) -> bool:
    """Whether anything besides logging happens after step `done` (then every loss is read first)."""
    out = config.output
    return (done == config.train.steps or bool(out.sample_every and done % out.sample_every == 0)
            or bool(out.checkpoint_every and done % out.checkpoint_every == 0)
            or (scoring is not None and scoring.due(done)) or (stop is not None and stop.is_set()))


def _report_steps(records, state: TrainState, clock: dict) -> Iterator[ev.Event]:
    """StepDone events and log lines (rank 0) for finished steps; stop when the run diverged (a
    non-finite loss; under fp16 see `scaling.divergence`: an overflow the scaler skipped is not
    divergence). fp16 lines carry the loss scale the step used; skipped steps are always logged, with
    the count so far. Returns the last step reported (0 for none)."""
    config, run = state.config, state.run
    out = config.output
    done = 0
    for done, (loss, instance, prior), lr, scaling in records:
        why = divergence(loss, scaling)
        if why:
            raise _diverged(why, done, run)
        skipped = scaling is not None and scaling.skipped
        clock["skipped"] = clock.get("skipped", 0) + skipped
        now = time.perf_counter()
        event = ev.StepDone(done, config.train.steps, loss, instance, prior, lr, now - clock["last"])
        clock["last"] = now
        if state.ranks.main and (done % out.log_every == 0 or done == config.train.steps or skipped):
            scaled = {} if scaling is None else {"loss_scale": scaling.loss_scale, "skipped": skipped,
                                                 "skipped_steps": clock["skipped"]}
            run.append_log({"step": done, "loss": loss, "instance_loss": event.instance_loss,
                            "prior_loss": event.prior_loss, "lr": event.lr, "time": round(now - clock["began"], 4),
                            "memory_mb": _memory_mb(config), **scaled})
        yield event
    return done


def _diverged(what: str, step: int, run: RunDir) -> TrainingDiverged:
    """The error for a diverged run, naming the newest checkpoint whose weights are intact."""
    good = newest_intact(run.checkpoints)
    return TrainingDiverged(f"{what} at step {step}", [Problem(
        str(run.root), f"last good checkpoint: {good or 'none'}; lower train.lr, or use bf16 instead of fp16")])


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGINT/SIGTERM set `stop`, so the loop saves a checkpoint and exits cleanly. Yields the list of
    signals caught, for the caller's exit status (128 + signal number, as shells report)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        caught.append(signum)
        stop.set()
    for s in previous:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def train(config: RunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
          stop: threading.Event | None = None, on_event=None) -> ev.Event:
    """Run training to the end (or until stopped); return the last event (Finished or Stopped)."""
    stop = stop or threading.Event()
    last = None
    with stop_on_signals(stop):
        for last in train_events(config, output, resume=resume, overwrite=overwrite, stop=stop):
            if on_event:
                on_event(last)
    return last


def _card():
    """The GPU an out-of-memory advice plans for (None without CUDA)."""
    return read_card() if torch.cuda.is_available() else None


def _memory_mb(config: RunConfig) -> float:
    """The peak allocated on the training device since its phase began (CUDA), or the process's peak RSS."""
    return round(peak_now(pick_device(config.train.device))[0], 1)
