"""`torch.compile` with the compiler's on-disk cache kept beside the tool's other caches.

Inductor caches compiled graphs in `$TMPDIR/torchinductor_<user>` unless told otherwise, which a
reboot (or a fresh notebook) empties. Its cache is what makes the second compile of the same UNet
cheap (CPU, tiny UNet with LoRA: 108 s cold, 6.6 s warm; benchmarks/RESULTS.md), so it lives under
`cache_root()/inductor`. A `TORCHINDUCTOR_CACHE_DIR` set by the user wins.
"""
from __future__ import annotations

import os

import torch

from .models import cache_root


def use_tool_cache() -> None:
    """Point inductor's on-disk cache at the tool's cache (for code that calls torch.compile itself)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def compiled(module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """`torch.compile(module, mode=mode)`; the module itself is left as it is."""
    use_tool_cache()
    return torch.compile(module, mode=mode)
