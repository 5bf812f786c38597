"""Single-file checkpoints (original Stable Diffusion key layout).

Reading them is its own piece of work (config detection, safe loading of pickles); until it lands,
MODEL as a single file fails with a clear message instead of a confusing stack trace.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelSourceError, Problem


def single_file_folder(path: Path) -> Path:
    raise ModelSourceError(
        f"single-file checkpoints are not supported yet: {path}",
        [Problem(str(path), "convert it to a diffusers folder first, or pass a diffusers folder")],
    )
