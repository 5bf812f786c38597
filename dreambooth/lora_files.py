"""LoRA weight files: apply them to a pipeline whatever layout they are in."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelSourceError, Problem


def load_lora_into_pipeline(pipe, path: Path, *, scale: float = 1.0, adapter_name: str = "subject") -> None:
    """Apply a LoRA file (diffusers/PEFT or kohya layout: diffusers converts kohya keys itself)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ModelSourceError(f"cannot use LoRA file {path}", [
            Problem(str(path), "expected an existing .safetensors LoRA file (pickle files are not loaded)")])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[scale])
