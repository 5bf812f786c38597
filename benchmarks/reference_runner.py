"""Run diffusers' example DreamBooth scripts and time them from their own progress bars.

The scripts print tqdm bars ("Generating class images" per batch, "Steps" per optimizer step). We
read their output as it comes and stamp each new count with our clock, so steady-state rates leave
out start-up, class generation and the first (warm-up) steps. The script runs under
reference_probe.py, which prints torch's peak memory counters twice a second. Once enough steps are
seen the process is stopped: its final save is not part of what we measure.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BAR = re.compile(r"(Generating class images|Steps):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
MEM = re.compile(r"MEMPROBE (\d+) (\d+)")
PROBE = Path(__file__).with_name("reference_probe.py")


@dataclass
class Progress:
    """Clock stamps of each new count of each bar, and the last memory probe."""

    began: float = field(default_factory=time.perf_counter)
    stamps: dict = field(default_factory=lambda: {"Generating class images": [], "Steps": []})
    peak_allocated: int = 0
    peak_reserved: int = 0

    def feed(self, text: str) -> None:
        now = time.perf_counter() - self.began
        for name, n, _total in BAR.findall(text):
            seen = self.stamps[name]
            if not seen or int(n) > seen[-1][1]:
                seen.append((now, int(n)))
        for alloc, reserved in MEM.findall(text):
            self.peak_allocated, self.peak_reserved = (max(self.peak_allocated, int(alloc)),
                                                       max(self.peak_reserved, int(reserved)))

    def steps(self) -> int:
        return self.stamps["Steps"][-1][1] if self.stamps["Steps"] else 0


def steady_rate(stamps: list[tuple[float, int]], skip: int) -> float | None:
    """Counts per second between the first stamp at or past `skip` and the last stamp."""
    later = [s for s in stamps if s[1] >= skip]
    if len(later) < 2 or later[-1][0] <= later[0][0]:
        return None
    return (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0])


def reference_args(kind: str, model: Path, instance: Path, classes: Path, output: Path, num_class: int,
                   max_steps: int, resolution: int) -> list[str]:
    """The issue's recipe: 1 subject + 1 class image per step, prior preservation, bf16, constant LR."""
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance),
            "--class_data_dir", str(classes), "--output_dir", str(output),
            "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of a dog",
            "--with_prior_preservation", "--prior_loss_weight", "1.0", "--num_class_images", str(num_class),
            "--resolution", str(resolution), "--center_crop", "--train_batch_size", "1", "--sample_batch_size", "4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(max_steps),
            "--checkpointing_steps", "1000000", "--seed", "0", "--report_to", "tensorboard"]
    if kind == "lora":
        args += ["--learning_rate", "1e-4", "--rank", "4"]
    else:
        args += ["--learning_rate", "5e-6"]
    if kind == "full_te":
        args += ["--train_text_encoder", "--gradient_checkpointing"]
    if kind == "e2e":  # the paper's recipe to the end: 4 validation images after the last step, then the save
        args += ["--validation_prompt", "a photo of sks dog on the moon", "--num_validation_images", "4",
                 "--validation_steps", str(max_steps)]
    return args


def run_reference(script: Path, args: list[str], *, stop_after: int, budget_s: float, mixed_precision: str,
                  log) -> dict:
    """Run `script args` until `stop_after` steps are seen or the budget ends; return the timings."""
    cmd = [sys.executable, str(PROBE), str(script), "--mixed_precision", mixed_precision, *args]
    if mixed_precision != "no":
        cmd += ["--prior_generation_precision", "fp16"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TQDM_MININTERVAL="0")
    progress = Progress()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    os.set_blocking(proc.stdout.fileno(), False)
    tail = ""
    while proc.poll() is None and time.perf_counter() - progress.began < budget_s and progress.steps() < stop_after:
        chunk = proc.stdout.read() or b""
        if chunk:
            text = chunk.decode(errors="replace")
            log.write(text)
            tail = (tail + text)[-4000:]
            progress.feed(tail[-len(text) - 200:])
        else:
            time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read() or b""
    log.write(rest.decode(errors="replace"))
    progress.feed(rest.decode(errors="replace"))
    result = summarize(progress, stop_after, finished and proc.returncode != 0, tail)
    # start to exit (model saved) when it ran to its end; the interpreter start is inside this
    result["total_s"] = time.perf_counter() - progress.began if finished and proc.returncode == 0 else None
    return result


def summarize(progress: Progress, stop_after: int, failed: bool, tail: str) -> dict:
    gen = progress.stamps["Generating class images"]
    steps = progress.stamps["Steps"]
    first_step = steps[0][0] if steps else None
    return {
        "steps_seen": progress.steps(),
        "steps_per_s": steady_rate(steps, skip=max(5, stop_after // 5)),
        # batches of 4 images; skip the first batch (pipeline load, cuDNN warm-up)
        "class_images_per_s": (lambda r: r * 4 if r else None)(steady_rate(gen, skip=1)),
        "startup_s": first_step,
        "generation_s": (gen[-1][0] - gen[0][0]) if len(gen) > 1 else None,
        "peak_allocated_gb": progress.peak_allocated / 1e9,
        "peak_reserved_gb": progress.peak_reserved / 1e9,
        "failed": failed,
        "error_tail": tail[-1500:] if failed else "",
    }
