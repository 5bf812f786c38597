"""The preparation phase of a training run: load the base model, make or reuse class images, set up
what trains and how, restore a checkpoint when resuming, cache latents; the result is one
`TrainState`. Like the loop it yields progress events and makes no UI calls.
"""
from __future__ import annotations

import os
from typing import Generator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from dreambooth.config import RunConfig
from dreambooth.data.images import load_rgb
from dreambooth.data.masks import load_masks
from dreambooth.errors import ConfigError, Problem
from dreambooth.identifier import check_identifier
from dreambooth.models import load_components
from dreambooth.models.components import hash_in_background
from dreambooth.models.vae import load_vae
from dreambooth.precision import resolve_precision
from dreambooth.ranks import Ranks
from dreambooth.rundir import RunDir
from dreambooth.sampling import pick_device
from dreambooth.training import events as ev
from dreambooth.training.batches import LatentSource, class_source
from dreambooth.training.checkpoints import list_checkpoints, resume_checkpoint
from dreambooth.training.ema import WeightAverage
from dreambooth.training.fast import (
    lower_frozen_weights,
    lowers_frozen,
    prepare_modules,
    raise_trainable_to_fp32,
    use_fast_path,
    wants_flat,
)
from dreambooth.training.flat import flatten_modules
from dreambooth.training.memory import PhaseMeter, release_memory
from dreambooth.training.outputs import prepare_class_images
from dreambooth.training.scaling import LossScaler
from dreambooth.training.scoring import CheckpointScoring
from dreambooth.training.setup import make_lr_schedule, make_optimizer, mark_trainable
from dreambooth.training.state import FrozenParking, PromptEmbeddings, TrainState, text_encoders_stay_on_cpu
from dreambooth.training.weight_copy import copies_apply, copy_modules

Events = Generator[ev.Event, None, "TrainState | None"]


def prepare(config: RunConfig, run: RunDir, report, resume: bool, stop, meter: PhaseMeter | None = None,
            ranks: Ranks = Ranks()) -> Events:
    """Yield events while preparing; return the state, or None when `stop` ended it before step 1.

    `report` is `data.images.check_images`'s report of the subject photos; the run directory is
    prepared and locked. `meter` measures the phases (class images, model setup: what trains and its
    optimizer, latent cache, text embeddings) and carries on into the state. With several processes
    (`ranks`) they share the class images and the latent cache; rank 0 alone writes.
    """
    meter = meter or PhaseMeter()
    yield ev.Phase("loading")  # the web app's name for it: a failure here means the model did not load
    with ranks.main_first():  # a built-in model is built into the cache once
        components = load_components(config.model.name, prediction_type=config.model.prediction_type)
        if config.model.vae:
            components.vae = load_vae(config.model.vae, components.vae)
    if config.prior.enabled and ranks.main:  # the class-image key's hash, while the models go to the device
        hash_in_background(components.folder)
    for problem in check_identifier(components.tokenizer, config.data.identifier, config.data.class_noun):
        yield ev.Notice(str(problem))
    device = pick_device(config.train.device)
    precision = mixed_precision_here(config.train.mixed_precision, device)
    if config.train.weights == "bf16" and precision != "bf16":  # auto gave fp16 (no bf16 on the card) or "no" (CPU)
        raise ConfigError("train.weights=bf16 needs bf16 mixed precision", [Problem(
            "train.weights", f"this run resolved train.mixed_precision to {precision!r}: use train.weights=fp32 "
            "(with a smaller preset), or a card with bf16 (compute capability 8.0+)")])
    # fp16: the steps run their own autocast and loss scaler (training/scaling.py) on any device;
    # accelerate's scaler lives in its optimizer wrapper and would scale a second time
    accelerator = make_accelerator(device, "no" if precision == "fp16" else precision)
    fast = yield from _place_models(components, config, accelerator, precision)
    class_paths = []
    if config.prior.enabled:
        yield ev.Phase("class images", config.prior.num_images)
        with meter.phase("class images", accelerator.device):
            for done, total, paths in prepare_class_images(components, config, accelerator.device, stop, ranks,
                                                            frozen_dtype_of(precision)):
                yield ev.ClassImagesProgress(done, total)
                class_paths = paths
        release_memory(accelerator.device)  # the sampling pipeline's leftovers, before the optimizer
        if ranks.any(stop is not None and stop.is_set()):  # stopped while making class images: nothing trained yet
            step, path = (list_checkpoints(run.checkpoints) or [(0, run.checkpoints)])[-1]
            yield ev.Stopped(step, path)
            return None
    with meter.phase("model setup", accelerator.device):
        trained = yield from _optimization(components, config, run, accelerator, precision, fast, resume, ranks)
    yield ev.Phase("caching latents", len(report.images) + (config.prior.num_images if config.prior.enabled else 0))
    with meter.phase("latent cache", accelerator.device):
        instances, classes = _latent_sources(components, config, report, class_paths, ranks)
    with meter.phase("text embeddings", accelerator.device):
        prompts = PromptEmbeddings(components, config, accelerator.device, frozen_dtype_of(precision))
    scoring = CheckpointScoring(components, config, run) if config.eval.every and ranks.main else None
    parking = FrozenParking(components, config, accelerator.device)
    if config.train.offload_frozen and not parking.modules:
        yield ev.Notice("train.offload_frozen has no effect: the latents are not cached (random crop or "
                        "cache_latents off), so the VAE and text encoder stay on the device")
    parking.park()
    if accelerator.device.type == "cuda":  # hand back the blocks class sampling and VAE encoding left cached
        torch.cuda.empty_cache()
    return TrainState(config, run, components, accelerator, instances=instances, classes=classes, prompts=prompts,
                      parking=parking, scoring=scoring, fast=fast, lag=readout_lag(fast, accelerator.device),
                      meter=meter, ranks=ranks, **trained)


def _place_models(components, config: RunConfig, accelerator, precision: str) -> Generator[ev.Event, None, bool]:
    """Move the models to the device in their dtypes; return whether the fast step runs."""
    device, frozen_dtype = accelerator.device, frozen_dtype_of(precision)
    components.vae.to(device, vae_dtype(components, frozen_dtype))
    if not text_encoders_stay_on_cpu(config, device):  # those stay fp32 on the CPU
        for text_encoder in components.text_encoders:
            text_encoder.to(device, frozen_dtype if not config.train.train_text_encoder else torch.float32)
    fast, notice = use_fast_path(config, device, accelerator.num_processes, precision)
    # The fast step stores a LoRA run's frozen UNet in the autocast dtype (_optimization); placing it
    # so at once spares the fp32 copy on the card (SDXL: 10.3 GB where 5.1 GB stay)
    components.unet.to(device, frozen_dtype if lowers_frozen(config, fast, frozen_dtype) else None)
    if notice:  # why the plain step runs, or how several processes share the fast one
        yield ev.Notice(notice)
    if not fast and config.train.optimizer.endswith("_torchao"):
        yield ev.Notice(f"{config.train.optimizer} on the plain step updates tensor by tensor: the first step compiles "
                        "one kernel per parameter shape (minutes), and each step launches one per tensor; "
                        "the fast step (train.fast) gives it flat buffers")
    if fast:
        prepare_modules(components, config, device)
    return fast


def _optimization(components, config: RunConfig, run: RunDir, accelerator, precision: str, fast: bool,
                  resume: bool, ranks: Ranks = Ranks()) -> Generator[ev.Event, None, dict]:
    """What trains, its optimizer, schedule and fp16 loss scaler (restored from the newest
    checkpoint when resuming), as `TrainState` fields. A checkpoint holds no per-process state:
    every process restores the same one (rank 0 first, which sets damaged ones aside), whatever
    number of processes wrote it."""
    device, frozen_dtype = accelerator.device, frozen_dtype_of(precision)
    modules = mark_trainable(components, config.train)
    if lowers_frozen(config, fast, frozen_dtype):
        raise_trainable_to_fp32(modules)  # peft gives new adapters the dtype of the layer they sit on
    if config.train.weights == "bf16":
        for module in modules.values():
            module.to(torch.bfloat16)
    if copies_apply(config, fast, precision, device):
        flats = copy_modules(modules)  # bf16 copies the optimizer writes (training/weight_copy.py)
    else:
        flats = flatten_modules(modules) if fast and wants_flat(config, device) else None
    optimizer = make_optimizer(modules, config.train, device, flats)
    lr_schedule = make_lr_schedule(optimizer, modules, config.train)
    scaler = LossScaler(device) if precision == "fp16" else None
    ema = WeightAverage(modules, config.train.ema_decay) if config.train.ema_decay else None
    start = 0
    if resume:
        with accelerator.main_process_first():
            start, warnings = resume_checkpoint(run.checkpoints, modules, optimizer, lr_schedule, scaler, ema)
        for warning in warnings:
            yield ev.Notice(warning)
        if start and ranks.main:
            run.truncate_log(start)
    if lowers_frozen(config, fast, frozen_dtype):
        lower_frozen_weights(modules, frozen_dtype)
    # The fast step runs its own autocast on the bare modules and, with several processes, averages
    # their gradients itself (FastStep._average). The plain step keeps the bare optimizer too:
    # accelerate's wrapper only adds its own fp16 scaler's step and update, and the scaler here is
    # the steps' own. Under several processes `prepare` wraps the plain step's modules in DDP
    # (without find_unused_parameters: every trainable parameter reaches the loss, see
    # setup.freeze_unused_layers).
    wrapped = modules if fast else dict(zip(modules, accelerator.prepare(*modules.values(), optimizer)[:-1]))
    return dict(modules=modules, wrapped=wrapped, optimizer=optimizer, lr_schedule=lr_schedule, flats=flats,
                scaler=scaler, ema=ema, start=start)


def _latent_sources(components, config: RunConfig, report, class_paths: list, ranks: Ranks = Ranks()
                    ) -> tuple[LatentSource, LatentSource | None]:
    """The subject photos' latents (encoded once when they are cached, each process its share) and
    the class images' (the sampler's, from the class-image cache)."""
    data, cache = config.data, config.train.cache_latents
    instances = LatentSource([load_rgb(i.path, max_pixels=data.max_pixels) for i in report.images],
                             components.vae, data.resolution, crop=data.crop, cache=cache, ranks=ranks,
                             masks=load_masks(report.images, data.masks, max_pixels=data.max_pixels))
    classes = None
    if config.prior.enabled:
        classes = class_source(class_paths[: config.prior.num_images], components.vae, data.resolution,
                               cache=cache, ranks=ranks)
    return instances, classes


def readout_lag(fast: bool, device: torch.device) -> int:
    """Steps by which the loop reads losses late: 1 for the fast step on CUDA, so the host never
    waits for the step it has just queued; 0 (read at once) elsewhere."""
    return 1 if fast and device.type == "cuda" else 0


def prefer_reproducible_mkl() -> None:
    """Ask Intel MKL for bitwise run-to-run reproducible results (its CNR mode, MKL_CBWR).

    Without it MKL's multi-threaded SGEMM is not reproducible for some shapes: the backward of a 3x3
    convolution on a 1x1 map at batch 1 (PyTorch's slow_conv2d, chosen over oneDNN there) gives a
    different rounding from call to call with 2 threads, so two identical CPU runs, or the plain
    and the fast step, drift apart. MKL reads the mode once, at its first call, so this runs when
    training is imported; the user's MKL_CBWR wins. AUTO keeps the CPU's fast code path.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


prefer_reproducible_mkl()


def prefer_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments in place rather than cache fixed-size blocks,
    which reserves less memory at the same speed. It can only be chosen before CUDA starts, and the
    user's PYTORCH_(CUDA_)ALLOC_CONF wins."""
    chosen = any(name in os.environ for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if not chosen and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def mixed_precision_here(name: str, device: torch.device) -> str:
    """`train.mixed_precision` resolved for the training device (its compute capability, or the CPU)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_precision(name, capability)


def make_accelerator(device: torch.device, mixed_precision: str) -> Accelerator:
    """An Accelerator on `device` (`cpu=True` for the CPU, even where CUDA is present).

    accelerate keeps its state in process-wide singletons set by the first Accelerator, and a later
    one asking for another device or precision raises ("AcceleratorState has already been
    initialized"); `cpu=True` cannot move an existing CUDA state. A process that trains run after
    run (the web app, a test session) needs each run's own choice, so a single-process state that
    differs is cleared first (accelerate's `_reset_state`, what its own tests do between cases).
    Under a distributed launch the state belongs to the launcher and is left as it is.
    """
    old_device = PartialState._shared_state.get("device")
    old_precision = AcceleratorState._shared_state.get("_mixed_precision", mixed_precision)
    differs = old_device is not None and (old_device.type != device.type or old_precision != mixed_precision)
    if differs and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def vae_dtype(components, frozen_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: the frozen one, except fp32 for an SDXL VAE whose config says `force_upcast`
    under fp16. SDXL's original VAE overflows fp16 (activations past 65504 give NaN latents and
    black samples); an fp16-fix VAE (`model.vae`) says force_upcast false and stays fp16. bf16 has
    fp32's range and stays, as diffusers' SDXL pipeline upcasts for fp16 only."""
    upcast = components.is_xl and getattr(components.vae.config, "force_upcast", False)
    return torch.float32 if upcast and frozen_dtype == torch.float16 else frozen_dtype


def frozen_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen models (VAE, a frozen text encoder) under `mixed_precision`."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
