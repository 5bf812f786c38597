"""One optimizer step over a flat fp32 buffer the size of the SD 1.5 UNet (859.5 M parameters):
torch's fused AdamW, bitsandbytes' AdamW8bit, torchao's AdamW8bit and AdamWFp8, and our AdamWFp8,
timed with CUDA events.

    python benchmarks/optim_probe.py [--numel 859520964] [--steps 20]

Prints one JSON line per optimizer: ms per step (GPU), first-step seconds (torchao compiles its
kernel there), state bytes, and how far its weights moved from fused AdamW's after the same
gradients (8-bit states round; this is the size of that rounding, not a test).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def make(name: str, param: torch.nn.Parameter):
    if name == "fused_adamw":
        return torch.optim.AdamW([param], lr=5e-6, fused=True)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit([param], lr=5e-6)
    if name in ("adamwfp8", "adamwfp8_grad_scale"):  # ours: one fused Triton kernel (training/adamw_fp8.py)
        from dreambooth.training.adamw_fp8 import AdamWFp8

        optimizer = AdamWFp8([param], lr=5e-6)
        if name == "adamwfp8_grad_scale":  # clipping folded in, as on the fast step
            optimizer.grad_scale = torch.tensor(1.5, device=param.device)
        return optimizer
    from torchao.optim import AdamW8bit, AdamWFp8

    kind = AdamWFp8 if name == "torchao_adamwfp8" else AdamW8bit
    return kind([param], lr=torch.tensor(5e-6, device=param.device))


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                inner = [getattr(value, a) for a in ("codes", "scale", "qmap") if hasattr(value, a)]
                total += sum(t.numel() * t.element_size() for t in (inner or [value]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=859_520_964)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--which", default="fused_adamw,bnb_adamw8bit,torchao_adamw8bit")
    args = parser.parse_args()
    torch.manual_seed(0)
    init = torch.randn(args.numel, device="cuda") * 0.02
    grads = [torch.randn(args.numel, device="cuda") * 1e-3 for _ in range(2)]
    finals = {}
    for name in args.which.split(","):
        param = torch.nn.Parameter(init.clone())
        param.grad = grads[0].clone()
        optimizer = make(name, param)
        began = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        first = time.perf_counter() - began
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        for i in range(args.steps):
            param.grad.copy_(grads[i % 2])
            optimizer.step()
        end.record()
        torch.cuda.synchronize()
        host = (time.perf_counter() - host) / args.steps
        s2, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s2.record()
        for i in range(args.steps):
            param.grad.copy_(grads[i % 2])
        e2.record()
        torch.cuda.synchronize()
        copy_ms = s2.elapsed_time(e2) / args.steps
        finals[name] = param.detach().clone()
        moved = (finals[name] - init).abs().mean().item()
        diff = (finals[name] - finals["fused_adamw"]).abs().mean().item() if "fused_adamw" in finals else None
        print(json.dumps({"optimizer": name, "ms_per_step": start.elapsed_time(end) / args.steps - copy_ms,
                          "host_ms_per_step": host * 1e3, "first_step_s": first,
                          "state_gb": state_bytes(optimizer) / 1e9, "mean_abs_update": moved,
                          "mean_abs_diff_vs_fused": diff,
                          "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}), flush=True)
        del optimizer, param
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
