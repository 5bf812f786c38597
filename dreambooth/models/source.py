"""Find out what MODEL is, before loading anything: detect, then load once.

MODEL can be a built-in name, a diffusers folder, a single checkpoint file, or a hub id. Each kind
has exactly one loader; anything else is a `ModelSourceError` that says what was expected.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dreambooth.errors import ModelSourceError, Problem
from dreambooth.models.builtin import BUILTIN_NAMES, builtin_path

SourceKind = Literal["builtin", "diffusers", "single_file", "hub"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: SourceKind
    path: Path | None  # local folder or file; None for a hub id not yet downloaded
    revision: str | None = None  # hub revision, when kind == "hub"


def detect_source(spec: str, *, revision: str | None = None) -> ModelSource:
    """Classify MODEL without loading weights."""
    if spec in BUILTIN_NAMES:
        path = builtin_path(spec)
        if not (path / "model_index.json").exists():
            raise ModelSourceError(
                f"built-in model {spec!r} is missing from this install",
                [Problem(str(path), "expected a diffusers folder here; reinstall the package")],
            )
        return ModelSource(spec, "builtin", path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").exists() or (path / "unet" / "config.json").exists():
            return ModelSource(spec, "diffusers", path)
        if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "log.jsonl").exists()):
            raise _unfinished_run(spec, path)
        raise ModelSourceError(
            f"{spec} is a folder but not a diffusers model",
            [Problem(spec, "expected model_index.json (or unet/, vae/, text_encoder/, tokenizer/); "
                     "for a training run use its final/ folder or pass the run directory to generate")],
        )
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            # imported here: formats.single_file imports dreambooth.models.builtin, whose package
            # __init__ imports this module
            from dreambooth.formats.single_file import check_single_file

            check_single_file(path)  # the loader's rules now, so a check (the web app's) agrees with it
            return ModelSource(spec, "single_file", path)
        raise ModelSourceError(
            f"{spec} is not a model file",
            [Problem(spec, f"expected one of {', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder")],
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return ModelSource(spec, "hub", None, revision)
    raise ModelSourceError(
        f"cannot find model {spec!r}",
        [Problem(spec, "not a built-in name (" + ", ".join(BUILTIN_NAMES) + "), "
                 "an existing folder or file, or a hub id like 'owner/name'")],
    )


def _unfinished_run(spec: str, path: Path) -> ModelSourceError:
    """A run directory whose training never wrote final/ (stopped, crashed or still running)."""
    steps = sorted(d.name for d in (path / "checkpoints").glob("step-*") if (d / "state.json").exists())
    where = f"its latest checkpoint is checkpoints/{steps[-1]}" if steps else "it has no checkpoint yet"
    return ModelSourceError(f"{spec} is a training run with no final model yet", [
        Problem(str(path / "final"), f"missing: the training did not finish ({where}). Resume it with "
                f"`dreambooth train --resume --output {spec}` and the same --images, then use the run directory")])


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set, read as huggingface_hub reads it (1/on/yes/true, any case),
    at call time so a change of the environment after import counts."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hub(source: ModelSource) -> Path:
    """Download (or find in the local cache) a hub model; fail fast and clearly when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    patterns = ["*.json", "*.txt", "*.safetensors", "tokenizer/*", "scheduler/*"]
    try:
        folder = snapshot_download(
            source.spec, revision=source.revision, allow_patterns=patterns, local_files_only=offline
        )
    except LocalEntryNotFoundError as e:
        raise ModelSourceError(
            f"hub model {source.spec!r} is not available offline",
            [Problem(source.spec, "HF_HUB_OFFLINE is set and the model is not in the local cache; "
                     "download it once with network access, or pass a local diffusers folder")],
        ) from e
    except Exception as e:  # network errors come in many types; report the one we got
        raise ModelSourceError(
            f"could not download hub model {source.spec!r}",
            [Problem(source.spec, f"{type(e).__name__}: {e}. Check the id and your network, "
                     "or pass a local diffusers folder")],
        ) from e
    return Path(folder)
