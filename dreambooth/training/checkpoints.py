"""Resumable checkpoints, written atomically (dreambooth.atomic) and pruned to the last K.

A checkpoint holds the trainable tensors (the whole UNet for a full fine-tune, only the adapters
for LoRA), the optimizer and LR-scheduler states, the fp16 loss scaler's state (scale and growth
tracker, when the run has one), the weights' moving average (`ema.safetensors`, when the run keeps
one: train.ema_decay) and the step. No RNG state is needed: every
random draw of step k comes from a generator seeded by (seed, k), so resuming at k reproduces the
uninterrupted run exactly.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth.atomic import prune_stale_temporaries, replace_folder
from dreambooth.errors import Problem, RunDirError

_STEP_DIR = re.compile(r"^step-(\d{5,})$")


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{'unet.<param>': tensor, 'text_encoder.<param>': tensor} for parameters that train."""
    return {
        f"{prefix}.{name}": p.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module], optimizer,
                    lr_scheduler, keep: int, scaler=None, ema=None) -> Path:
    def write(tmp: Path) -> None:
        save_file(trainable_state(modules), tmp / "trainable.safetensors")
        if ema is not None:
            save_file(ema.state_dict(), tmp / EMA_FILE)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / SCALER_FILE)
        (tmp / "state.json").write_text(json.dumps({"step": step}))

    target = replace_folder(checkpoint_folder(folder, step), write)  # an older one of the same step is replaced
    prune_checkpoints(folder, keep)
    return target


def checkpoint_folder(folder: Path, step: int) -> Path:
    """Where the checkpoint of step `step` is (or will be) written."""
    return folder / f"step-{step:05d}"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first (temp folders of an interrupted save are ignored)."""
    found = []
    for d in folder.iterdir() if folder.exists() else []:
        m = _STEP_DIR.match(d.name)
        if m and (d / "state.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(folder: Path, keep: int) -> None:
    for _, d in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(d)
    prune_stale_temporaries(folder)  # left by a save that was killed


def module_part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one module in a `trainable_state` dict, with the module prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


class CheckpointDamaged(Exception):
    """A checkpoint folder that cannot be read back whole, or holds non-finite weights."""


FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
SCALER_FILE = "scaler.pt"  # fp16 runs only; checkpoints written before it existed lack it
EMA_FILE = "ema.safetensors"  # runs with train.ema_decay only


def read_checkpoint(path: Path) -> tuple[int, dict, dict, dict]:
    """(step, trainable tensors, optimizer state, scheduler state), every part read and checked
    before anything is applied: a truncated file, a missing part or a NaN weight raises
    `CheckpointDamaged`, so resuming can fall back to an older checkpoint."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointDamaged(f"missing {', '.join(missing)}")
    try:
        step = int(json.loads((path / "state.json").read_text())["step"])
        state = load_file(path / "trainable.safetensors")  # reads (and so checks) every tensor
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        scheduler = torch.load(path / "scheduler.pt", weights_only=True)
    except Exception as e:  # safetensors, pickle and JSON each fail their own way on a torn file
        raise CheckpointDamaged(f"{type(e).__name__}: {e}") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointDamaged(f"non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}")
    return step, state, optimizer, scheduler


def newest_intact(folder: Path) -> Path | None:
    """The newest checkpoint that reads back whole with finite weights (what a divergence report
    may call the last good one)."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            read_checkpoint(path)
            return path
        except CheckpointDamaged:
            continue
    return None


def resume_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler, scaler=None,
                      ema=None) -> tuple[int, list[str]]:
    """Restore the newest intact checkpoint; return its step (0: none) and a warning per damaged
    newer one, which is renamed to step-NNNNN.damaged so it is neither resumed nor kept as a good one
    (and a notice when an fp16 run resumes a checkpoint without loss-scaler state)."""
    notes = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            step = load_checkpoint(path, modules, optimizer, lr_scheduler, ema)
        except CheckpointDamaged as e:
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            notes.append(f"warning: checkpoint {path} is damaged ({e}); moved it to {aside.name} and "
                         "resumed from the newest intact one")
            continue
        if scaler is not None:
            notes.extend(load_scaler(path, scaler))
        return step, notes
    if notes:
        raise RunDirError(f"no intact checkpoint in {folder}", [Problem(n, "") for n in notes] + [Problem(
            str(folder), "start again with --overwrite")])
    return 0, notes


def weights_are_finite(modules: dict[str, torch.nn.Module]) -> bool:
    return all(torch.isfinite(p).all() for m in modules.values() for p in m.parameters() if p.requires_grad)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler, ema=None) -> int:
    """Restore a checkpoint in place and return its step (`CheckpointDamaged` if it is unreadable);
    with `ema` (an `ema.WeightAverage`) its saved average too."""
    step, state, optimizer_state, scheduler_state = read_checkpoint(path)
    average = read_average(path) if ema is not None else None
    for prefix, module in modules.items():
        own = module_part(state, prefix)
        expected = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(own) != expected:
            raise RunDirError(
                f"checkpoint {path} does not match this run's trainable parameters",
                [Problem(str(path), f"{prefix}: {len(expected - set(own))} missing, {len(set(own) - expected)} "
                         "unexpected; was the config changed since the run started?")],
            )
        module.load_state_dict(own, strict=False)
    try:
        optimizer.load_state_dict(optimizer_state)
    except ValueError as e:  # a different tensor layout: flat buffers (fast step) vs per-tensor (plain)
        raise RunDirError(f"checkpoint {path} holds optimizer state for a different parameter layout", [
            Problem(str(path), f"{e}; resume on the same kind of device with the same train.fast and "
                    "train.optimizer as the run that wrote it (8-bit and FP8 AdamW on the fast step keep flat "
                    "buffers; so does AdamW with train.weight_copy, on by default for full fine-tunes under bf16 "
                    "on the fast step: resume with --set train.weight_copy=true), or start a new run")]) from e
    lr_scheduler.load_state_dict(scheduler_state)
    if average is not None:
        try:
            ema.load_state_dict(average)
        except KeyError as e:
            raise RunDirError(f"checkpoint {path} holds a weight average of other parameters", [Problem(
                str(path / EMA_FILE), f"{e}; was the config changed since the run started?")]) from e
    return step


def read_average(path: Path) -> dict[str, torch.Tensor]:
    """The weight average a checkpoint of a run with train.ema_decay holds, read and checked whole."""
    if not (path / EMA_FILE).is_file():
        raise CheckpointDamaged(f"missing {EMA_FILE}, the weight average this run keeps (train.ema_decay)")
    try:
        average = load_file(path / EMA_FILE)
    except Exception as e:  # a torn file
        raise CheckpointDamaged(f"{EMA_FILE}: {type(e).__name__}: {e}") from e
    bad = [k for k, v in average.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointDamaged(f"non-finite weight average in {len(bad)} tensor(s), e.g. {bad[0]}")
    return average


def load_scaler(path: Path, scaler) -> list[str]:
    """Restore the fp16 loss scaler from checkpoint `path`; a checkpoint without its state (written
    before it was saved) leaves the scaler fresh, with a notice."""
    if not (path / SCALER_FILE).is_file():
        return [f"checkpoint {path} has no loss-scaler state (written before it was saved): fp16 "
                f"resumes with a fresh scale of {scaler.state_dict()['scale']:g}, which adapts within a few steps"]
    try:
        scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
    except Exception as e:  # a torn file: the scale re-adapts, the weights are what matters
        return [f"warning: checkpoint {path}: loss-scaler state unreadable ({type(e).__name__}: {e}); "
                "fp16 resumes with a fresh scaler"]
    return []
