"""The DreamBooth training loop: one readable generator of progress events, which the CLI
and the web app render (the loop makes no UI calls).

    for event in train_events(config, "runs/dog"):
        print(event)

Order of work: validate config and photos (no weights loaded yet), prepare the run directory, load
the base model, make or reuse class images, then train with the prior-preservation loss.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from dreambooth.config import RunConfig, read_run_config, save_config
from dreambooth.data.images import check_images, load_rgb
from dreambooth.errors import ConfigError, Problem, TrainingDiverged
from dreambooth.rundir import RunDir
from dreambooth.training import events as ev
from dreambooth.training.batches import LatentSource, build_batch, latents_cached, step_generator
from dreambooth.training.checkpoints import list_checkpoints, newest_intact, resume_checkpoint, save_checkpoint, weights_are_finite
from dreambooth.training.fast import FastStep, LossReadout, lower_frozen_weights, prepare_modules, use_fast_path, wants_flat
from dreambooth.training.flat import flatten_modules
from dreambooth.training.losses import add_noise, dreambooth_loss, prediction_target, sample_timesteps
from dreambooth.training.preflight import check_before_loading, with_local_model_resolved
from dreambooth.prompts import fill_prompt
from dreambooth.training.outputs import prepare_class_images, save_final, write_samples
from dreambooth.training.scoring import CheckpointScoring
from dreambooth.training.setup import count_trainable, make_lr_schedule, make_optimizer, mark_trainable


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
    report = check_images(config.data.images, config.data.resolution, max_pixels=config.data.max_pixels)
    with run.prepare(resume=resume, overwrite=overwrite):  # held until the generator ends
        save_config(config, run.config)
        if fresh_resume:
            yield ev.Notice(f"{run.root} never reached step 1: starting it again with the given settings")
        for problem in report.problems:
            yield ev.Notice(str(problem))
        yield from _train(config, run, report, resume and not fresh_resume, stop)


def _train(config: RunConfig, run: RunDir, report, resume: bool, stop) -> Iterator[ev.Event]:
    """Load the model, make class images, then train (the run directory is prepared and locked)."""
    from accelerate import Accelerator

    from dreambooth.identifier import check_identifier
    from dreambooth.models import load_components

    components = load_components(config.model.name, prediction_type=config.model.prediction_type)
    for problem in check_identifier(components.tokenizer, config.data.identifier, config.data.class_noun):
        yield ev.Notice(str(problem))
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.train.mixed_precision))
    device, frozen_dtype = accelerator.device, _frozen_dtype(accelerator.mixed_precision)
    components.vae.to(device, frozen_dtype)
    components.text_encoder.to(device, frozen_dtype if not config.train.train_text_encoder else torch.float32)
    components.unet.to(device)
    fast, why_not = use_fast_path(config, device, accelerator.num_processes, accelerator.mixed_precision)
    if why_not:
        yield ev.Notice(why_not)
    if not fast and config.train.optimizer.endswith("_torchao"):
        yield ev.Notice(f"{config.train.optimizer} on the plain step updates tensor by tensor: the first step compiles "
                        "one kernel per parameter shape (minutes), and each step launches one per tensor; "
                        "the fast step (train.fast) gives it flat buffers")
    if fast:
        prepare_modules(components, config, device)

    class_paths = []
    if config.prior.enabled:
        yield ev.Phase("class images", config.prior.num_images)
        for done, total, paths in prepare_class_images(components, config, device, stop):
            yield ev.ClassImagesProgress(done, total)
            class_paths = paths
        if stop is not None and stop.is_set():  # stopped while making class images: nothing trained yet
            step, path = (list_checkpoints(run.checkpoints) or [(0, run.checkpoints)])[-1]
            yield ev.Stopped(step, path)
            return

    modules = mark_trainable(components, config.train)
    flats = flatten_modules(modules) if fast and wants_flat(config, device) else None
    optimizer = make_optimizer(modules, config.train, device, flats)
    lr_schedule = make_lr_schedule(optimizer, modules, config.train)
    start = 0
    if resume:
        start, warnings = resume_checkpoint(run.checkpoints, modules, optimizer, lr_schedule)
        for warning in warnings:
            yield ev.Notice(warning)
        if start:
            run.truncate_log(start)
    if fast and config.train.mode == "lora" and frozen_dtype != torch.float32:
        lower_frozen_weights(modules, frozen_dtype)
    # The fast step runs its own autocast on the bare modules (one process only).
    wrapped = modules if fast else dict(zip(modules, accelerator.prepare(*modules.values(), optimizer)[:-1]))

    yield ev.Phase("caching latents", len(report.images) + (config.prior.num_images if config.prior.enabled else 0))
    instances = LatentSource([load_rgb(i.path, max_pixels=config.data.max_pixels) for i in report.images],
                             components.vae, config.data.resolution, crop=config.data.crop,
                             cache=config.train.cache_latents, device=device, dtype=frozen_dtype)
    classes = None
    if config.prior.enabled:
        classes = LatentSource([load_rgb(p) for p in class_paths[: config.prior.num_images]], components.vae,
                               config.data.resolution, crop="center", cache=config.train.cache_latents,
                               device=device, dtype=frozen_dtype)
    prompts = PromptEmbeddings(components, config, device)
    scoring = CheckpointScoring(components, config, run) if config.eval.every else None

    parking = FrozenParking(components, config, device)
    if config.train.offload_frozen and not parking.modules:
        yield ev.Notice("train.offload_frozen has no effect: the latents are not cached (random crop or "
                        "cache_latents off), so the VAE and text encoder stay on the device")
    parking.park()
    if device.type == "cuda":  # hand back the blocks class sampling and VAE encoding left cached
        torch.cuda.empty_cache()
    yield ev.Started(start, config.train.steps, count_trainable(modules), str(device), accelerator.mixed_precision)
    step_fn = lambda step: training_step(step, config, components, wrapped, prompts, instances, classes,
                                         accelerator, optimizer, lr_schedule)
    if fast:
        step_fn = FastStep(config, components, modules, prompts, instances, classes, accelerator, optimizer,
                           lr_schedule, accelerator.mixed_precision, flats)
    lag = 1 if fast and device.type == "cuda" else 0
    yield from run_steps(step_fn, start, config, run, modules, optimizer, lr_schedule, components, stop, scoring,
                         lag=lag, parking=parking)


def prefer_reproducible_mkl() -> None:
    """Ask Intel MKL for bitwise run-to-run reproducible results (its CNR mode, MKL_CBWR).

    Without it MKL's multi-threaded SGEMM is not reproducible for some shapes: the backward of a 3x3
    convolution on a 1x1 map at batch 1 (PyTorch's slow_conv2d, chosen over oneDNN there) gives a
    different rounding from call to call with 2 threads, so two identical CPU runs, or the plain
    and the fast step, drift apart. MKL reads the mode once, at its first call, so this runs when
    the training loop is imported; the user's MKL_CBWR wins. AUTO keeps the CPU's fast code path.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


prefer_reproducible_mkl()


def prefer_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments in place rather than cache fixed-size blocks: on
    an H100 the lean preset reserved 0.25-0.9 GB less at the same speed (benchmarks/RESULTS.md). It
    can only be chosen before CUDA starts, and the user's PYTORCH_(CUDA_)ALLOC_CONF wins."""
    chosen = any(name in os.environ for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if not chosen and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


class FrozenParking:
    """`train.offload_frozen`: the frozen VAE (and text encoder) wait on the CPU while steps run.

    The steps never call them once latents and prompt embeddings are cached; samples, scoring and
    the end of training bring them back (`back()`). Nothing moves unless asked, nor when latents are
    not cached (the random-crop step encodes every batch).
    """

    def __init__(self, components, config: RunConfig, device: torch.device, park_to: str = "cpu"):
        frozen = [components.vae] + ([] if config.train.train_text_encoder else [components.text_encoder])
        self.modules = frozen if config.train.offload_frozen and latents_cached(config) else []
        self.device, self.park_to = device, park_to

    def park(self) -> None:
        for module in self.modules:
            module.to(self.park_to)

    @contextlib.contextmanager
    def back(self):
        for module in self.modules:
            module.to(self.device)
        try:
            yield
        finally:
            self.park()


def run_steps(step_fn, start, config, run, modules, optimizer, lr_schedule, components, stop,
              scoring=None, lag: int = 0, parking: FrozenParking | None = None) -> Iterator[ev.Event]:
    """Steps, logging, samples and checkpoints; ends with Finished or Stopped.

    With `lag` > 0 the losses of a step are read (and its StepDone yielded) that many steps later,
    except before samples, scoring, checkpoints, a stop and the end, which see every step reported.
    """
    out = config.output
    back = parking.back if parking is not None else contextlib.nullcontext
    began = time.perf_counter()
    clock = {"began": began, "last": began}
    readout = LossReadout(lag)
    for step in range(start, config.train.steps):
        parts = step_fn(step)
        done = step + 1
        readout.push(done, parts, float(lr_schedule.get_last_lr()[0]))  # a tensor for torchao
        yield from _report_steps(readout.take(flush=_acts_after(done, config, scoring, stop)), config, run, clock)
        if wants_samples(config) and out.sample_every and done % out.sample_every == 0 and done < config.train.steps:
            yield ev.Phase("validation images", len(out.sample_prompts) * out.sample_images)
            with back():
                path = write_samples(components, config, run, done)
            yield ev.SampleWritten(done, path)
        if scoring is not None and scoring.due(done):
            with back():
                row = scoring.score(done, modules)
            yield ev.Evaluated(done, row)
        stopping = stop is not None and stop.is_set()
        yield from _report_steps(readout.take(flush=stopping), config, run, clock)
        if (out.checkpoint_every and done % out.checkpoint_every == 0) or stopping:
            if not weights_are_finite(modules):  # a finite loss, then an update that overflowed
                raise _diverged("the weights became NaN or infinite", done, run)
            path = save_checkpoint(run.checkpoints, done, modules, optimizer, lr_schedule, out.keep_checkpoints)
            yield ev.CheckpointSaved(done, path)
            if stopping:
                yield ev.Stopped(done, path)
                return
    choice = scoring.finish(modules) if scoring is not None else None
    if choice is not None:
        yield ev.Selected(*choice)
    final = save_final(components, config, run, selection=choice)  # first: nothing optional can lose it
    if scoring is not None:
        scoring.cleanup()
    if wants_samples(config):
        yield ev.Phase("validation images", len(out.sample_prompts) * out.sample_images)
        with back():
            path = write_samples(components, config, run, config.train.steps)
        yield ev.SampleWritten(config.train.steps, path)
    yield ev.Finished(config.train.steps, final, time.perf_counter() - began)


def wants_samples(config: RunConfig) -> bool:
    """Validation grids are written unless output.sample_images (or the prompt list) is 0."""
    return config.output.sample_images > 0 and bool(config.output.sample_prompts)


def _acts_after(done: int, config: RunConfig, scoring, stop) -> bool:
    """Whether anything besides logging happens after step `done` (then every loss is read first)."""
    out = config.output
    return (done == config.train.steps or bool(out.sample_every and done % out.sample_every == 0)
            or bool(out.checkpoint_every and done % out.checkpoint_every == 0)
            or (scoring is not None and scoring.due(done)) or (stop is not None and stop.is_set()))


def _report_steps(records, config: RunConfig, run: RunDir, clock: dict) -> Iterator[ev.Event]:
    """StepDone events and log lines for finished steps; stop at a non-finite loss."""
    out = config.output
    for done, (loss, instance, prior), lr in records:
        if not math.isfinite(loss):
            raise _diverged(f"the loss became {loss}", done, run)
        now = time.perf_counter()
        event = ev.StepDone(done, config.train.steps, loss, instance, prior, lr, now - clock["last"])
        clock["last"] = now
        if done % out.log_every == 0 or done == config.train.steps:
            run.append_log({"step": done, "loss": loss, "instance_loss": event.instance_loss,
                            "prior_loss": event.prior_loss, "lr": event.lr, "time": round(now - clock["began"], 4),
                            "memory_mb": _memory_mb()})
        yield event


def _diverged(what: str, step: int, run: RunDir) -> TrainingDiverged:
    """The error for a diverged run, naming the newest checkpoint whose weights are intact."""
    good = newest_intact(run.checkpoints)
    return TrainingDiverged(f"{what} at step {step}", [Problem(
        str(run.root), f"last good checkpoint: {good or 'none'}; lower train.lr, or use bf16 instead of fp16")])


def training_step(step, config, components, wrapped, prompts, instances, classes, accelerator, optimizer,
                  lr_schedule):
    """One optimizer step (with gradient accumulation) of eq. 2 of Ruiz et al."""
    train = config.train
    unet = wrapped["unet"]
    for module in wrapped.values():
        module.train()
    alphas = components.noise_scheduler.alphas_cumprod
    num_t = components.noise_scheduler.config.num_train_timesteps
    seed = train.seed + 1000 * accelerator.process_index
    for micro in range(train.grad_accum):
        k = step * train.grad_accum + micro
        latents, is_prior = build_batch(k, seed, instances, classes, train.batch_size, config.data.flip_prob)
        g = step_generator(seed, k, salt=2)
        noise = torch.randn(latents.shape, generator=g).to(latents)  # (B, 4, H/8, W/8)
        t = sample_timesteps(latents.shape[0], num_t, g).to(latents.device)
        noisy = add_noise(latents, noise, t, alphas)
        target = prediction_target(latents, noise, t, alphas, components.prediction_type)
        sync = micro == train.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
            context = prompts.batch(is_prior, wrapped.get("text_encoder"))  # (B, 77, D)
            pred = unet(noisy, t, context).sample
            parts = dreambooth_loss(pred, target, is_prior.to(pred.device), config.prior.weight)
            accelerator.backward(parts.total / train.grad_accum)
    if train.max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(params, train.max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


class PromptEmbeddings:
    """Text-encoder outputs for the subject and class prompts; computed once when it is frozen."""

    def __init__(self, components, config: RunConfig, device: torch.device):
        tok = components.tokenizer
        data = config.data
        texts = [fill_prompt(data.instance_prompt, data.identifier, data.class_noun),
                 fill_prompt(data.class_prompt, data.identifier, data.class_noun)]
        self.ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)  # (2, 77)
        self.frozen = None
        if not config.train.train_text_encoder:
            with torch.no_grad():
                self.frozen = components.text_encoder(self.ids)[0]  # (2, 77, D)

    def batch(self, is_prior: torch.Tensor, text_encoder) -> torch.Tensor:
        index = is_prior.long().to(self.ids.device)
        if self.frozen is not None:
            return self.frozen[index]
        return text_encoder(self.ids)[0][index]


def resume_config(saved: RunConfig, given: RunConfig) -> RunConfig:
    """On resume the saved config rules; only the step count and output settings may change."""
    a, b = saved.to_dict(), given.to_dict()
    free = ("output", "eval")  # may change on resume: they do not alter the weights
    diffs = [f"{g}.{k}" for g in a for k in a[g] if a[g][k] != b[g][k] and g not in free and k != "steps"]
    if diffs:
        raise ConfigError("--resume with a changed configuration would not reproduce the run", [
            Problem(d, f"saved {a[d.split('.')[0]][d.split('.')[1]]!r}, given {b[d.split('.')[0]][d.split('.')[1]]!r}; "
                    "drop the change or start a new run") for d in diffs])
    merged = dict(a, output=b["output"], eval=b["eval"])
    merged["train"] = dict(a["train"], steps=b["train"]["steps"])
    from dreambooth.config import build_config

    return build_config(merged)


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


def _mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def _frozen_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
