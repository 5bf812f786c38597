"""One flat buffer per trained module, for optimizers that work one tensor at a time.

bitsandbytes' 8-bit AdamW launches its kernel, and runs some Python, once per parameter tensor (686
tensors in the SD 1.5 UNet). Here the module's parameters become views into one contiguous fp32
buffer, and their gradients views into a second one, so the optimizer sees a few large tensors per
module (one launch each) while the module trains exactly as before. The 8-bit states are quantized
in blocks of the flat buffer rather than of each tensor; that is the only numerical difference.

Gradients accumulate into the flat buffer (autograd adds into an existing `.grad` in place), so
the buffer is zeroed before each backward instead of being set to None.

Each view keeps its parameter's strides (a channels-last convolution weight stays channels-last),
and its gradient view has the same strides, so element k of the flat parameter and element k of
the flat gradient always belong to the same weight, which is what an optimizer reading raw memory
needs (docs/training-step.md: channels-last with per-tensor 8-bit AdamW).
"""
from __future__ import annotations

import torch

BLOCK = 256  # 8-bit AdamW quantizes its states in blocks of 256; torchao needs whole blocks
# torchao's compiled update holds two fp32 temporaries the size of the tensor it updates (3.4 GB each
# for the whole SD 1.5 UNet), so the optimizer sees the buffer in equal chunks of at most 16 M
# elements (2 x 64 MB of temporaries), one launch each.
CHUNK = 2**24


class FlatModule:
    """The trainable parameters of one module as views of one buffer (`data`, gradients in `grad`),
    handed to the optimizer as a few large `Parameter` chunks of it (`params`)."""

    def __init__(self, module: torch.nn.Module, multiple: int = BLOCK, chunk: int = CHUNK):
        if chunk < multiple or chunk % multiple:
            raise ValueError(f"chunk {chunk} must be a positive multiple of {multiple}")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("module has no trainable parameters")
        dtype, device = params[0].dtype, params[0].device
        used = sum(p.numel() for p in params)
        # equal chunks (one compiled kernel shape for torchao), each whole blocks; the tail past
        # `used` is padding: zero, with zero gradient
        pieces = -(-used // chunk)
        chunk = -(-used // (pieces * multiple)) * multiple
        total = pieces * chunk
        flat = torch.zeros(total, dtype=dtype, device=device)
        grad = torch.zeros(total, dtype=dtype, device=device)
        offset = 0
        for p in params:
            if not is_dense(p):
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not dense in memory; cannot flatten it")
            view = torch.as_strided(flat, p.shape, p.stride(), offset)
            view.copy_(p.detach())
            p.data = view
            p.grad = torch.as_strided(grad, p.shape, p.stride(), offset)
            offset += p.numel()
        self.data, self.grad = flat, grad
        self.params = []  # what the optimizer gets: consecutive chunks of the buffer
        for start in range(0, total, chunk):
            piece = torch.nn.Parameter(flat[start : start + chunk])
            piece.grad = grad[start : start + chunk]
            self.params.append(piece)

    def release(self) -> None:
        """Drop the gradient buffer (training is over)."""
        for piece in self.params:
            piece.grad = None
        self.grad = None


def is_dense(t: torch.Tensor) -> bool:
    """Its elements fill exactly `numel` consecutive slots (contiguous, channels-last, ...)."""
    order = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for stride, size in order:
        if stride != expected:
            return False
        expected *= size
    return True


def flatten_modules(modules: dict[str, torch.nn.Module]) -> dict[str, FlatModule]:
    return {name: FlatModule(module) for name, module in modules.items()}
