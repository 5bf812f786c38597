"""Our side of the benchmark: each function runs one measurement in its own process and returns a
dict for results.jsonl. They drive the library exactly as the CLI does (train_events, the class-image
cache), so what is timed is what a user runs.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from dreambooth.config import load_config


def gpu_memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    segments = torch.cuda.memory._snapshot().get("segments", [])
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
            "expandable_segments": any(s.get("is_expandable") for s in segments)}


def limit_memory(cap_gb: float | None) -> None:
    """Pretend the card has `cap_gb` (a 16 GB card leaves about 15 GB to PyTorch)."""
    if cap_gb and torch.cuda.is_available():
        from dreambooth.training.prepare import prefer_expandable_segments

        prefer_expandable_segments()  # what train_events does first; the cap below starts CUDA
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))


def run_worker_process(cmd: list[str], part_log: Path, budget: float, env: dict | None = None
                       ) -> tuple[dict | None, int, str]:
    """Run a benchmark worker with its output going to `part_log` as it is written (a worker killed
    at its budget still shows how far it got); return its last `RESULT {json}` line (None without
    one), its exit status and its whole output."""
    with open(part_log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = part_log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1][7:]) if lines else None), proc.returncode, text


def start_profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def stop_profiler(prof, steps: int) -> str:
    """Top ops by device time over the profiled steps (per step: divide by `steps`)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.stop()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60)
    print(f"PROFILE over {steps} steps\n{table}", flush=True)
    return table


def run_config(model: Path, images: Path, preset: str, dotted: list[str]):
    return load_config(preset, {"model": {"name": str(model)}, "data": {"images": str(images), "class_noun": "dog"}},
                       dotted)


def train_part(model: Path, images: Path, out: Path, *, preset: str, dotted: list[str], measure: int,
               cap_gb: float | None = None, profile: int = 0) -> dict:
    """Steady-state steps/s of the training loop: `measure` steps, the first fifth left out as warm-up;
    then `profile` more steps under torch.profiler (kernel time by op, after the timed steps)."""
    from dreambooth.training import events as ev
    from dreambooth.training import train_events

    limit_memory(cap_gb)
    config = run_config(model, images, preset, ["train.steps=100000", "output.checkpoint_every=0",
                                                "output.log_every=50", *dotted])
    stamps, losses, notices, began = [], [], [], time.perf_counter()
    started = None
    for event in train_events(config, out, overwrite=True):
        stamp = time.perf_counter() - began
        if not isinstance(event, ev.StepDone) or event.step % 20 == 0 or event.step <= 3:
            print(f"[{stamp:7.1f} s] {type(event).__name__} {getattr(event, 'step', '')}", flush=True)
        if isinstance(event, ev.Notice):
            notices.append(event.message)
        if isinstance(event, ev.Started):
            started = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        if isinstance(event, ev.StepDone):
            if event.step <= measure:
                stamps.append(time.perf_counter())
                losses.append(event.loss)
            if event.step == measure:
                print("RESULT " + json.dumps(_train_result(stamps, losses, notices, measure, began, started)),
                      flush=True)
                if profile:
                    profiler = start_profiler()
            if event.step >= measure + profile:
                break
    kernels = stop_profiler(profiler, profile) if profile and stamps and len(stamps) >= measure else None
    return {**_train_result(stamps, losses, notices, measure, began, started), "profile": kernels}


def _train_result(stamps, losses, notices, measure, began, started) -> dict:
    skip = max(3, measure // 5)
    rate = (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip]) if len(stamps) > skip + 1 else None
    return {"steps_per_s": rate, "steps": len(stamps), "setup_s": started - began if started else None,
            "first_step_s": stamps[0] - started if stamps and started else None, "losses": losses,
            "notices": notices, **gpu_memory()}


def reference_classes_part(model: Path, batch: int, batches: int, *, pipeline: str, dtype: torch.dtype,
                           size: int, steps: int, prompt: str) -> dict:
    """Class images/s of the diffusers pipeline's default call (its scheduler, `steps` steps, its
    guidance), decoded to PIL images, as the reference scripts make their class images; the first
    batch is warm-up. UNet evaluations per image are read from the scheduler (two per timestep)."""
    import diffusers

    cuda = torch.cuda.is_available()
    extra = {} if pipeline == "StableDiffusionXLPipeline" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline).from_pretrained(str(model), torch_dtype=dtype, **extra)
    pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    stamps = []
    for _ in range(batches + 1):
        pipe(prompt, num_images_per_prompt=batch, height=size, width=size, num_inference_steps=steps)
        stamps.append(time.perf_counter())
    return {"images_per_s": batch * batches / (stamps[-1] - stamps[0]), "images": batch * (batches + 1),
            "batch": batch, "unet_evals_per_image": 2 * len(pipe.scheduler.timesteps), **gpu_memory()}


def classes_part(model: Path, out: Path, *, sampler: str, steps: int, batch: int, num: int,
                 compile_unet: bool = False, profile: bool = False, fast: bool = False) -> dict:
    """Class images/s through the training run's own path (components as train_events holds them).
    `profile`: the batches after the first run under torch.profiler (kernel time by op, per image;
    the rate is then that of profiled batches). `fast`: `prior.fast` (a UNet copy in the frozen
    dtype behind CUDA graphs)."""
    from dreambooth.models import load_components
    from dreambooth.priors import class_image_key, ensure_class_images
    from dreambooth.sampling import make_pipeline
    from dreambooth.training.fast import prepare_modules

    config = run_config(model, out, "sd15-fast", [f"prior.sampler={sampler}", f"prior.steps={steps}",
                                                  f"prior.batch_size={batch}", f"prior.cache={out}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    components = load_components(str(model))
    components.vae.to(device, dtype)
    components.text_encoder.to(device, dtype)
    components.unet.to(device)
    prepare_modules(components, config, device)
    stamps, profiler = [], []

    def progress(done, total):
        stamps.append((time.perf_counter(), done))
        if profile and len(stamps) == 2:  # the first batch (compile, cuDNN tuning) is done
            profiler.append(start_profiler())

    began = time.perf_counter()
    ensure_class_images(class_image_key(components.folder, config), num,
                        lambda: make_pipeline(components, sampler, device=device, compile_unet=compile_unet,
                                              graphed=dtype if fast and device.type == "cuda" else None),
                        cache_dir=out, batch_size=batch, progress=progress)
    total = time.perf_counter() - began
    kernels = stop_profiler(profiler[0], num - stamps[1][1]) if profiler else None
    steady = stamps[1:]  # stamps[0] is the count before any work; the first batch warms up
    later = steady[1:] if len(steady) > 1 else steady
    rate = (later[-1][1] - steady[0][1]) / (later[-1][0] - steady[0][0]) if len(steady) > 1 else num / total
    return {"images_per_s": rate, "images": num, "batch": batch, "total_s": total, **gpu_memory(),
            "unet_evals_per_image": _evals_per_image(components, sampler, steps), "profile": kernels}


def _evals_per_image(components, sampler: str, steps: int) -> int:
    """UNet evaluations per image with classifier-free guidance (two per sampler step)."""
    from dreambooth.sampling import make_scheduler

    scheduler = make_scheduler(sampler, components.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    return 2 * len(scheduler.timesteps)


def e2e_part(model: Path, images: Path, out: Path, *, preset: str, dotted: list[str],
             profile_startup: bool = False) -> dict:
    """The paper's recipe end to end through `train` (the CLI's call); stage times from events.
    `profile_startup`: cProfile of the main thread from here to the first step (its overhead
    lengthens that stretch), the top functions by cumulative time in the result."""
    import cProfile
    import io
    import pstats

    from dreambooth.training import events as ev
    from dreambooth.training import train

    marks: dict[str, float] = {}
    began = time.perf_counter()
    profiler = cProfile.Profile() if profile_startup else None
    report: dict[str, str] = {}
    if profiler:
        profiler.enable()

    def on_event(event):
        now = time.perf_counter() - began
        name = type(event).__name__
        marks.setdefault(f"first_{name}", now)
        marks[f"last_{name}"] = now
        if isinstance(event, ev.Phase):  # which slow stretch began when
            marks.setdefault(f"phase {event.name}", now)
        if profiler and isinstance(event, ev.StepDone) and "startup_profile" not in report:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
            report["startup_profile"] = text.getvalue()[-12000:]

    config = run_config(model, images, preset, dotted)
    last = train(config, out, overwrite=True, on_event=on_event)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    phases = {r["phase"]: r["seconds"] for r in records if "phase" in r}  # the run's own phase clock
    return {"finished": isinstance(last, ev.Finished), "in_process_s": time.perf_counter() - began,
            "marks": marks, "phases": phases, **gpu_memory(), **report}
