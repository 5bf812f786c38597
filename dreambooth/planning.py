"""Which tier preset fits this GPU: read the card, tell MODEL's family, check each preset's memory.

The tier presets are named by the card they are built for (`sd15-12gb`, `sd21-16gb`, ...). Their
table (configs/tiers.json) gives each one's family, card size and target peak, plus measured peak
and speed once a GPU run has measured them; until then they are None and shown as "not measured",
and the fit is judged against the target. `plan(family, card)` is pure, so every card can be
tested without owning it; `read_card` and `model_family` gather its inputs without loading weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from dreambooth.config import GROUPS
from dreambooth.config_files import PRESET_DIR, read_preset
from dreambooth.errors import ConfigError, Problem
from dreambooth.model_family import ModelFamily, model_family
from dreambooth.precision import auto_precision as precision_for
from dreambooth.precision import has_native_bf16

TIERS_FILE = PRESET_DIR / "tiers.json"
# The CUDA context and the allocator's slack take about this much of a card before any tensor:
# a T4 reports 15.8 GB and leaves ~15.3 GB to the process, which is what a 15 GB target must fit.
CONTEXT_RESERVE_GB = 0.5
FAMILIES = {"sd15": "Stable Diffusion 1.x", "sd21": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
            "tiny": "built-in tiny random model", "tiny-xl": "built-in tiny random SDXL model",
            "toy": "the toy world's base model", "other": "another architecture",
            "unknown": "unknown family"}


@dataclass(frozen=True)
class Card:
    """The device to plan for; `memory_gb` None means no GPU (training runs on the CPU)."""

    name: str
    memory_gb: float | None  # total memory, GB = 1e9 bytes
    capability: tuple[int, int] | None = None  # CUDA compute capability; None when not read from a GPU

    @property
    def is_gpu(self) -> bool:
        return self.memory_gb is not None

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic: Ampere (8.0) and later; older cards emulate it or lack it."""
        return has_native_bf16(self.capability)

    @property
    def usable_gb(self) -> float:
        return max(0.0, (self.memory_gb or 0.0) - CONTEXT_RESERVE_GB)


@dataclass(frozen=True)
class Tier:
    """One row of the tier table, with what the preset trains read from its YAML."""

    preset: str
    family: str
    card_gb: float  # 0: runs on a CPU
    target_gb: float
    measured_peak_gb: float | None
    measured_steps_per_s: float | None
    measured_on: str | None
    trains: str
    resolution: int
    mixed_precision: str
    failed_under_cap: str | None = None  # measured and did not fit its target: what ran out

    @property
    def needs_gpu(self) -> bool:
        return self.card_gb > 0


@dataclass(frozen=True)
class Row:
    tier: Tier
    fits: bool
    precision: str  # what training would run in on this card: bf16, fp16 or fp32
    why: str


@dataclass(frozen=True)
class Plan:
    card: Card
    family: str
    rows: tuple[Row, ...]
    best: str | None  # the preset to train with; None when none fits
    notes: tuple[str, ...]


def load_tiers(path: Path = TIERS_FILE) -> tuple[Tier, ...]:
    """The tier table, each row completed from its preset YAML (resolution, mode, precision)."""
    rows = json.loads(Path(path).read_text())["tiers"]
    return tuple(Tier(**row, **_preset_facts(row["preset"])) for row in rows)


def _preset_facts(preset: str) -> dict:
    raw = read_preset(preset)
    defaults = {g: {f.name: f.default for f in fields(cls)} for g, cls in GROUPS.items()}
    value = lambda group, key: (raw.get(group) or {}).get(key, defaults[group][key])
    if value("train", "mode") == "lora":
        trains = f"LoRA rank {value('train', 'lora_rank')}"
    else:
        trains = "full UNet" + (" + text encoder" if value("train", "train_text_encoder") else "")
    return {"trains": trains, "resolution": int(value("data", "resolution")),
            "mixed_precision": value("train", "mixed_precision")}


def auto_precision(card: Card) -> str:
    """What `train.mixed_precision=auto` means on this card: bf16 only where it is native, fp16
    (with loss scaling) on older GPUs, fp32 on the CPU. "bf16/fp16" when the capability is unknown."""
    if card.is_gpu and card.capability is None:
        return "bf16/fp16"
    name = precision_for(card.capability if card.is_gpu else None)
    return {"no": "fp32"}.get(name, name)


def plan(family: str, card: Card, tiers: tuple[Tier, ...] | None = None) -> Plan:
    """Every preset of `family` with fit yes/no on `card`; best = the largest target that fits."""
    tiers = load_tiers() if tiers is None else tiers
    rows = tuple(_row(t, card) for t in tiers if t.family == family)
    fitting = [r.tier for r in rows if r.fits]
    best = max(fitting, key=lambda t: t.target_gb).preset if fitting else None  # max keeps the first of equals
    return Plan(card, family, rows, best, tuple(_notes(family, card, rows, best)))


def _row(tier: Tier, card: Card) -> Row:
    wanted = tier.mixed_precision
    precision = auto_precision(card) if wanted == "auto" or not card.is_gpu else {"no": "fp32"}.get(wanted, wanted)
    if tier.needs_gpu and not card.is_gpu:
        return Row(tier, False, "-", f"needs a CUDA GPU with {tier.card_gb:g} GB")
    if wanted == "bf16" and card.capability is not None and not card.bf16:
        return Row(tier, False, precision, "needs native bf16 (compute capability 8.0+)")
    if not tier.needs_gpu:
        return Row(tier, True, precision, "runs anywhere")
    if tier.failed_under_cap:
        return Row(tier, False, precision, f"does not fit its {tier.target_gb:g} GB yet: {tier.failed_under_cap}")
    need, what = ((tier.measured_peak_gb, "measured peak") if tier.measured_peak_gb is not None
                  else (tier.target_gb, "target"))
    fits = need <= card.usable_gb
    return Row(tier, fits, precision, f"{what} {need:g} GB {'<=' if fits else '>'} {card.usable_gb:.1f} GB usable")


def _notes(family: str, card: Card, rows: tuple[Row, ...], best: str | None) -> list[str]:
    notes = []
    if not card.is_gpu:
        notes.append("no GPU found: planning for the CPU, where only the tiny and toy models train in "
                     "reasonable time; pass --gpu-memory 16GB to plan for a card you do not have here")
    elif card.capability is None:
        notes.append("compute capability unknown (no GPU read): auto precision is bf16 on 8.0+ cards, "
                     "fp16 on older ones")
    elif not card.bf16:
        notes.append(f"compute capability {card.capability[0]}.{card.capability[1]}: no native bf16, so "
                     "mixed precision auto trains in fp16 with loss scaling")
    if family == "unknown":
        notes.append("the model's family cannot be told offline: pass --family sd15, sd21 or sdxl")
    elif not rows:
        notes.append(f"no tier presets for {FAMILIES.get(family, family)}; pick a preset by hand "
                     "(dreambooth train --preset NAME) and lower memory with --set train.gradient_checkpointing=true")
    elif best is None and card.is_gpu:
        smallest = min(rows, key=lambda r: r.tier.target_gb).tier
        notes.append(f"no preset fits {card.usable_gb:.1f} GB usable; the smallest, {smallest.preset}, "
                     f"is built for a {smallest.card_gb:g} GB card"
                     + (" but does not fit it yet (its row says what ran out)" if smallest.failed_under_cap else ""))
    return notes


def pick_preset(model: str, card: Card | None = None) -> tuple[Plan, ModelFamily]:
    """The plan `train --preset auto` follows for MODEL on this machine's (or the given) card, with
    the family it was made for; `plan.best` is the preset. Raises ConfigError when none fits."""
    card = read_card() if card is None else card
    found = model_family(model)
    result = plan(found.family, card)
    if result.best is None:
        raise ConfigError(f"no tier preset fits {model} on {card.name}", [
            Problem("--preset auto", "; ".join(result.notes) or "no preset fits; see `dreambooth plan`")])
    return result, found


def read_card(gpu_memory: str | None = None) -> Card:
    """The first CUDA device (name, memory, capability); `gpu_memory` ("16GB") overrides its memory,
    or stands for a card when there is no GPU here."""
    import torch

    memory = parse_memory(gpu_memory) if gpu_memory else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name, total = props.name, props.total_memory / 1e9
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(0)
        if fraction < 1.0:  # this process was capped (set_per_process_memory_fraction): plan for the cap
            name, total = f"{name} capped at {total * fraction:.1f} GB", total * fraction
        return Card(name, total if memory is None else memory, (props.major, props.minor))
    if memory is not None:
        return Card(f"--gpu-memory {gpu_memory} (no GPU here)", memory, None)
    return Card("CPU", None, None)


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(gb|g|gib|mb|m|mib)?\s*$", re.IGNORECASE)
_UNITS = {"gb": 1.0, "g": 1.0, "gib": 2**30 / 1e9, "mb": 1e-3, "m": 1e-3, "mib": 2**20 / 1e9}


def parse_memory(text: str) -> float:
    """GB (1e9 bytes) from "16GB", "16", "15.5G", "16GiB" or "12000MB"."""
    match = _MEMORY.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read the memory size {text!r}", [
            Problem("--gpu-memory", f"{text!r}: give a size such as 16GB, 11.5GB or 12000MB")])
    return float(match.group(1)) * _UNITS[(match.group(2) or "gb").lower()]
