"""Atomic writes: a file or folder is built under a hidden temporary name beside its target,
flushed to disk, and renamed into place, so a crash or kill never leaves half of it at the target.

Temporaries are named `.<name>.tmp-<pid>-<random>`; `prune_stale_temporaries` removes those whose
process no longer runs (left by SIGKILL or power loss). Every module that writes a file another
process or a later run reads (checkpoints, class images, manifests, exports, job records) goes
through here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

_TMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def temporary_name(target: Path) -> Path:
    """A hidden name beside `target`, unique to this process and call."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    _fsync(folder)


def replace_file(target: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a temporary file, fsync it, and rename it over `target` (replacing any old one)."""
    target = Path(target)
    tmp = temporary_name(target)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a successful replace
    return target


def write_bytes(target: Path, data: bytes) -> Path:
    return replace_file(target, lambda tmp: tmp.write_bytes(data))


def write_text(target: Path, text: str) -> Path:
    return replace_file(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(target: Path, obj: Any, indent: int | None = 1) -> Path:
    return write_text(target, json.dumps(obj, indent=indent))


def replace_folder(target: Path, write: Callable[[Path], None],
                   if_exists: Literal["replace", "keep", "error"] = "replace") -> Path:
    """`write(tmp)` into a temporary folder, fsync its files, and rename it to `target`.

    An existing `target` is removed first (`replace`), left as it is with the new folder discarded
    (`keep`: another process made the same thing first), or raises FileExistsError (`error`).
    """
    target = Path(target)
    tmp = temporary_name(target)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            if if_exists == "error":
                raise FileExistsError(17, "already exists; not overwritten", str(target))
            if if_exists == "keep":
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename
    return target


def prune_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporaries in `folder` left by processes that no longer run; returns them."""
    removed = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = _TMP.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own temporaries are in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
