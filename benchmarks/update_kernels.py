"""The optimizer update over SD 1.5's 860 M UNet weights on one GPU: the weight-copy kernel
(training/weight_copy.py: fp32 master, bf16 gradient, fp32 moments, bf16 copy written) against
torch's fused AdamW on fp32 gradients, and the plain fp32 -> bf16 copy for scale.

    python benchmarks/update_kernels.py > update_kernels.json

Both move 28 bytes per weight (24 GB per update).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreambooth.training.adamw_fp8 import AdamWStep  # noqa: E402
from dreambooth.training.weight_copy import update  # noqa: E402

WEIGHTS = 859_520_964  # SD 1.5 UNet


def milliseconds(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / reps * 1e3


def main() -> None:
    n, dev = WEIGHTS, "cuda"
    p, m = torch.randn(n, device=dev), torch.zeros(n, device=dev)
    v = torch.rand(n, device=dev) * 1e-6
    g = (torch.randn(n, device=dev) * 1e-3).bfloat16()
    copy = torch.empty(n, device=dev, dtype=torch.bfloat16)
    scale = torch.tensor([1.3], device=dev)
    hyper = AdamWStep(lr=5e-6, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, bc1=0.1, bc2_sqrt=0.03)
    out = {"device": torch.cuda.get_device_name(), "weights": n, "gb_per_update": n * 28 / 1e9}
    out["weight_copy_kernel_ms"] = milliseconds(lambda: update(p, g, m, v, copy, scale, hyper))
    out["fp32_to_bf16_copy_ms"] = milliseconds(lambda: copy.copy_(p))
    g32 = g.float()
    steps = [torch.tensor(1.0, device=dev)]
    out["torch_fused_adamw_ms"] = milliseconds(lambda: torch._fused_adamw_(
        [p], [g32], [m], [v], [], steps, lr=5e-6, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
        amsgrad=False, maximize=False, grad_scale=scale, found_inf=None))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
