"""Reading tensor files without trusting them: safetensors headers, and pickles limited to tensors.

Pickle files (.ckpt/.pt/.pth/.bin) are read with `torch.load(weights_only=True)` only: a pickle can
run arbitrary code when loaded, so anything that needs more than tensors and plain containers is
refused with `UnsafeCheckpointError`. Random or corrupt bytes are called corrupt, not unsafe.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth.errors import ModelSourceError, Problem, UnsafeCheckpointError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol 2+ starts with b"\x80" and its protocol byte


def read_header(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, without reading the weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelSourceError(f"cannot read {path}",
                               [Problem(str(path), f"not a valid safetensors file ({e})")]) from e


def safetensors_view(path: Path, work: Path) -> tuple[Path, dict[str, tuple], dict[str, str]]:
    """(safetensors path, {key: shape}, metadata); pickles are loaded safely and re-saved in `work`."""
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = read_header(path)
        return path, shapes, metadata
    state = load_pickle_state_dict(path)
    weights = work / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return weights, {k: tuple(v.shape) for k, v in state.items()}, {}


def file_shapes(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """({key: shape}, metadata) of any checkpoint file, reading a safetensors header only and a
    zip-format pickle memory-mapped, so checking a multi-GB file takes about a second."""
    if path.suffix.lower() == ".safetensors":
        return read_header(path)
    return {k: tuple(v.shape) for k, v in load_pickle_state_dict(path, lazy=True).items()}, {}


def is_torch_file(path: Path) -> bool:
    """True when the file starts like a torch.save output: a zip archive or a pickle (legacy format).

    Lets random or corrupt bytes be called corrupt instead of "a pickle that needs arbitrary code".
    """
    head = _head(path)
    return head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _not_a_checkpoint(path: Path, why: str) -> ModelSourceError:
    return ModelSourceError(f"cannot read {path}", [Problem(str(path), f"{why}; the file is corrupt, truncated "
                                                            "or not a model. Download or export it again")])


def load_pickle_state_dict(path: Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a pickle checkpoint, refusing anything beyond tensors and plain containers.

    `lazy`: memory-map the tensors of a zip-format file instead of reading them (for checks).
    """
    if not is_torch_file(path):
        raise _not_a_checkpoint(path, "not a checkpoint file (neither a zip archive nor a pickle)")
    mmap = lazy and _head(path) == _ZIP_MAGIC
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower():  # the pickle stream itself is broken, nothing was refused
            raise _not_a_checkpoint(path, f"not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from e
        raise UnsafeCheckpointError(f"refusing to load {path}: it is a pickle that needs arbitrary code", [
            Problem(str(path), "loading pickle checkpoints can run any code their author put in them, so only "
                    "tensors and plain containers are accepted (torch.load weights_only=True), and this file "
                    f"holds more ({str(e).splitlines()[0][:200]}). If you trust its source, convert it once in "
                    "an isolated environment: sd = torch.load(PATH, weights_only=False); "
                    "sd = sd.get('state_dict', sd); safetensors.torch.save_file({k: v.contiguous() for k, v in "
                    "sd.items() if isinstance(v, torch.Tensor)}, 'model.safetensors'); "
                    "then pass the .safetensors")]) from e
    except Exception as e:  # corrupt zip, truncated file
        raise _not_a_checkpoint(path, f"not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from e
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning-style {"state_dict": ..., "global_step": ...}
    if not isinstance(loaded, dict):
        raise ModelSourceError(f"cannot read {path}", [Problem(str(path), "expected a dict of tensors")])
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
