"""Peak memory of each phase of a training run, and out-of-memory errors that say what to change.

On CUDA a phase's peak is the allocator's: `reset_peak_memory_stats()` when it starts,
`max_memory_allocated()` / `max_memory_reserved()` when it ends. A phase inside another (validation
samples or checkpoint scoring during the steps) is measured on its own; the outer phase's peak and
seconds leave it out. On the CPU the only measure is the process's peak resident set size
(`getrusage`), which never goes down: a phase's value is the peak of the process so far, so it
shows which phase raised the high-water mark, not what the phase alone used.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from dreambooth.config import RunConfig
from dreambooth.errors import DreamboothError, OutOfMemory, Problem
from dreambooth.model_family import model_family
from dreambooth.planning import Card, plan
from dreambooth.training.checkpoints import newest_intact

MB = 2**20
CPU_MEASURE = "process peak RSS (never goes down)"
CUDA_MEASURE = "CUDA allocator peak"


@dataclass(frozen=True)
class PhasePeak:
    """One measured phase: its peaks in MiB and its seconds (`measure` says what the peaks are)."""

    phase: str
    peak_allocated_mb: float
    peak_reserved_mb: float
    seconds: float
    measure: str

    def record(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class _Open:
    name: str
    device: torch.device
    allocated: float = 0.0
    reserved: float = 0.0
    seconds: float = 0.0
    since: float = 0.0


class PhaseMeter:
    """Measures phases (`with meter.phase("class images", device): ...`) and logs each one.

    `log(record)` receives every finished phase's record (the run's log.jsonl). `advice(phase)` gives
    the problems an out-of-memory error in that phase lists (what to change, the kept checkpoint):
    a `torch.OutOfMemoryError` inside a phase becomes `OutOfMemory` naming the phase, the peak it
    had reached and the device's total.
    """

    def __init__(self, log: Callable[[dict], None] | None = None,
                 advice: Callable[[str], list[Problem]] | None = None):
        self.log, self.advice = log, advice
        self.peaks: list[PhasePeak] = []
        self._open: list[_Open] = []

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device | str) -> Iterator[None]:
        device = torch.device(device)
        if self._open:
            self._pause(self._open[-1])
        current = _Open(name, device)
        self._resume(current)
        self._open.append(current)
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory(self._close(name, oom=True), device, e) from None
        except BaseException:
            self._open.pop()
            raise
        else:
            self._close(name)
        finally:
            if self._open:
                self._resume(self._open[-1])

    def _close(self, name: str, oom: bool = False) -> PhasePeak:
        current = self._open.pop()
        self._pause(current)
        peak = PhasePeak(name, current.allocated, current.reserved, current.seconds,
                         CUDA_MEASURE if current.device.type == "cuda" else CPU_MEASURE)
        self.peaks.append(peak)
        if self.log is not None:
            self.log({**peak.record(), **({"out_of_memory": True} if oom else {})})
        return peak

    @staticmethod
    def _resume(current: _Open) -> None:
        if current.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(current.device)
        current.since = time.perf_counter()

    @staticmethod
    def _pause(current: _Open) -> None:
        allocated, reserved = peak_now(current.device)
        current.allocated, current.reserved = max(current.allocated, allocated), max(current.reserved, reserved)
        current.seconds += time.perf_counter() - current.since

    def summary(self) -> tuple[PhasePeak, ...]:
        """One row per phase name in the order they first ran: the highest peak, the total seconds."""
        rows: dict[str, PhasePeak] = {}
        for p in self.peaks:
            old = rows.get(p.phase)
            rows[p.phase] = p if old is None else replace(
                old, peak_allocated_mb=max(old.peak_allocated_mb, p.peak_allocated_mb),
                peak_reserved_mb=max(old.peak_reserved_mb, p.peak_reserved_mb), seconds=old.seconds + p.seconds)
        return tuple(rows.values())

    def unmeasured_out_of_memory(self, name: str, error: torch.OutOfMemoryError) -> OutOfMemory:
        """`OutOfMemory` for work outside a measured phase; its peak is the device's since the last phase."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        measure = CUDA_MEASURE if device.type == "cuda" else CPU_MEASURE
        return self.out_of_memory(PhasePeak(name, *peak_now(device), 0.0, measure), device, error)

    def out_of_memory(self, peak: PhasePeak, device: torch.device, error: Exception) -> OutOfMemory:
        """The error for `peak`'s phase; `error` (torch's) gives the size it asked for, and loses its
        traceback, whose frames hold the phase's tensors."""
        error.__traceback__ = None
        found = re.search(r"Tried to allocate [\d.]+ \w+", str(error))
        asked = found.group(0) if found else ""
        total = total_mb(device)
        summary = (f"out of memory during {peak.phase}: it had reached {_gb(peak.peak_allocated_mb)} "
                   f"({peak.measure}) of the {device.type.upper()} device's {_gb(total)}"
                   + (f"; {asked[0].lower()}{asked[1:]} more" if asked else ""))
        return OutOfMemory(summary, self.advice(peak.phase) if self.advice else [], phase=peak.phase,
                           peak_mb=peak.peak_allocated_mb, total_mb=total)


# What lowers each phase's peak, as (config key, value, applies(config)); every phase also gets the
# training switches, since the weights and optimizer state on the device count in all of them.
_TRAINING_SWITCHES = (
    ("train.gradient_checkpointing", "true", lambda c: not c.train.gradient_checkpointing),
    ("train.optimizer", "adamwfp8", lambda c: c.train.optimizer == "adamw"),
    ("train.offload_frozen", "true", lambda c: not c.train.offload_frozen),
    ("train.mode", "lora", lambda c: c.train.mode == "full"),
)
_PHASE_SWITCHES = {
    "class images": (("prior.batch_size", "1", lambda c: c.prior.batch_size > 1),),
    "validation samples": (("output.sample_images", "1", lambda c: c.output.sample_images > 1),),
    "checkpoint scoring": (("eval.num_per_prompt", "1", lambda c: c.eval.num_per_prompt > 1),),
}


def oom_advice(phase: str, config: RunConfig, checkpoints: Path, card: Card | None) -> list[Problem]:
    """What to change after running out of memory in `phase`: the tier preset that fits `card`
    (None: no GPU), the switches not yet on, and the newest intact checkpoint (kept)."""
    problems = []
    if card is not None and card.is_gpu:
        family = _family(config.model.name)
        best = plan(family, card).best if family else None
        if best:
            problems.append(Problem("--preset", f"{best} is the tier preset for this card ({card.name}, "
                                    f"{card.memory_gb:.1f} GB); `dreambooth plan --model {config.model.name}` "
                                    "lists what fits"))
    switches = [*_PHASE_SWITCHES.get(phase, ()), *_TRAINING_SWITCHES]
    for key, value, applies in switches:
        if applies(config):
            problems.append(Problem(key, f"--set {key}={value} lowers the peak"))
    good = newest_intact(checkpoints)
    problems.append(Problem(str(checkpoints.parent), (
        f"kept; last checkpoint: {good}; --resume continues it (output.* and eval.* may change then; other "
        "switches need a new run)") if good else "kept; no checkpoint was saved yet"))
    return problems


def _family(model: str) -> str | None:
    try:
        return model_family(model).family
    except DreamboothError:
        return None


def peak_now(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peaks in MiB since the last reset; the process peak RSS twice on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB, torch.cuda.max_memory_reserved(device) / MB
    rss = peak_rss_mb()
    return rss, rss


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def total_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / MB
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB


def release_memory(device: torch.device | str) -> None:
    """Free what finished work left behind: objects kept only by reference cycles (diffusers pipelines
    hold some), then, on CUDA, the allocator's cached blocks, so the next phase starts from what lives."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def memory_table(peaks: tuple[PhasePeak, ...] | list[PhasePeak]) -> str:
    """The per-phase peaks as a short text table (what `dreambooth train` prints at the end)."""
    if not peaks:
        return ""
    cpu = all(p.measure == CPU_MEASURE for p in peaks)
    head = "peak memory by phase, " + (f"{CPU_MEASURE}:" if cpu else "CUDA allocated / reserved:")
    width = max(len(p.phase) for p in peaks)
    lines = [head]
    for p in peaks:
        value = _gb(p.peak_allocated_mb) if cpu else f"{_gb(p.peak_allocated_mb)} / {_gb(p.peak_reserved_mb)}"
        lines.append(f"  {p.phase:<{width}}  {value:>20}  {p.seconds:8.1f} s")
    return "\n".join(lines)


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"
