"""`dreambooth train --gpus N`: the same command in N processes, started by accelerate's launcher
(what `accelerate launch -m dreambooth train ...` does), which trains one subject data-parallel."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

import torch

from dreambooth.errors import ConfigError, Problem
from dreambooth.ranks import launched_world_size
from dreambooth.training.loop import stop_on_signals

MAX_PROCESSES = 64


def without_gpus(argv: list[str]) -> list[str]:
    """The command line with `--gpus N` (or `--gpus=N`) taken out, for each launched process."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def launch_command(processes: int, argv: list[str]) -> list[str]:
    """accelerate's launcher (torchrun underneath) running `python -m dreambooth ARGV` N times.

    `--multi_gpu` picks its torchrun launcher, which on the CPU (`train.device=cpu`) starts CPU
    processes on gloo. The run chooses its own precision (`train.mixed_precision`, given to the
    Accelerator), so the launcher's machine, precision and dynamo settings are only its defaults,
    stated to keep it from warning about them.
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "dreambooth", *without_gpus(argv)]


def free_port() -> int:
    """A TCP port free now, for the processes to meet on: torchrun's fixed default (29500) would
    make two runs on one machine collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_processes(processes: int, device: str) -> None:
    """Refuse a count the machine cannot run, before anything starts."""
    problems = []
    if launched_world_size() > 1:
        problems.append(Problem("--gpus", "given inside a launched process: drop it (the launcher already "
                                "started the processes) or run `dreambooth train --gpus N` without a launcher"))
    if not 1 <= processes <= MAX_PROCESSES:
        problems.append(Problem("--gpus", f"{processes}: must be in 1..{MAX_PROCESSES}"))
    elif device != "cpu" and torch.cuda.device_count() < processes:
        problems.append(Problem("--gpus", f"{processes} asked, {torch.cuda.device_count()} CUDA device(s) "
                                "visible; ask for fewer, or pass --set train.device=cpu to test with CPU processes"))
    if problems:
        raise ConfigError("cannot start the training processes", problems)


def run_launched(processes: int, argv: list[str]) -> int:
    """Run the launcher and wait for it; its exit status is the command's (1 when a process failed).
    Ctrl-C reaches every process of the group, each of which saves and stops; this one waits."""
    with stop_on_signals(threading.Event()):
        return subprocess.call(launch_command(processes, argv))
