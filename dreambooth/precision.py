"""What `train.mixed_precision=auto` means on a device: the one rule that training and the planner share.

bf16 only where the GPU computes it natively (compute capability 8.0+, Ampere and later; older
cards emulate it slowly or lack it), fp16 with dynamic loss scaling on older CUDA cards, and full
precision ("no") on the CPU, where autocast buys nothing. Pure: the capability is passed in, so
every card can be tested without owning it.
"""
from __future__ import annotations

NATIVE_BF16 = (8, 0)


def has_native_bf16(capability: tuple[int, int] | None) -> bool:
    return capability is not None and tuple(capability) >= NATIVE_BF16


def auto_precision(capability: tuple[int, int] | None) -> str:
    """accelerate's name ("bf16", "fp16" or "no") for `auto` on a CUDA device of this compute
    capability; None means no CUDA device (the CPU)."""
    if capability is None:
        return "no"
    return "bf16" if has_native_bf16(capability) else "fp16"


def resolve_precision(name: str, capability: tuple[int, int] | None) -> str:
    """`train.mixed_precision` as training runs it: `auto` resolved, the others as given."""
    return auto_precision(capability) if name == "auto" else name
