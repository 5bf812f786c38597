"""AdamW with FP8 moments, updated by one fused Triton kernel per tensor on CUDA (train.optimizer=adamwfp8).

The state format is torchao's AdamWFp8's (float8 e4m3 codes in blocks of 256 values, one fp32 scale
per block), so memory is that of 8-bit AdamW; the kernel reads each gradient and state once and
divides the gradient by `grad_scale` as it reads it, so clipping costs no extra pass. The kernel
needs compute capability 8.9+; elsewhere the same arithmetic runs as torch ops. Tensors under 4096
values, of a size not a multiple of 256, or with gaps in memory keep fp32 moments. Why and how it
compares with torchao's optimizer: docs/training-step.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from dreambooth.training.flat import is_dense

BLOCK = 256
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_QUANTIZED = 4096


def quantizes(p: torch.Tensor) -> bool:
    return p.numel() >= MIN_QUANTIZED and p.numel() % BLOCK == 0 and is_dense(p)


def in_memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) view of `t`'s values in the memory order of the dense tensor `like` (a copy in `like`'s
    layout first when their strides differ)."""
    if t.stride() != like.stride():
        t = torch.empty_like(like, dtype=t.dtype).copy_(t)
    return t.as_strided((t.numel(),), (1,))


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> codes (n,) uint8 (e4m3 bits), scales (n / 256,) fp32."""
    blocks = x.view(-1, BLOCK)
    scale = blocks.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (blocks / scale[:, None]).to(FP8).view(torch.uint8).view(-1), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (codes.view(FP8).float().view(-1, BLOCK) * scale[:, None]).view(-1)


@dataclass(frozen=True)
class AdamWStep:
    """The scalars of one AdamW update of one parameter group: learning rate, betas, eps, decoupled
    weight decay, and the bias corrections 1 - beta1^t and sqrt(1 - beta2^t) of step t."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bc1: float
    bc2_sqrt: float

    @classmethod
    def of(cls, group: dict, step: float) -> "AdamWStep":
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                   1 - beta1**step, math.sqrt(1 - beta2**step))


def adamw_math(p, g, m, v, h: AdamWStep):
    """One AdamW update in fp32 on tensors of one shape; returns the new (p, m, v). The order of
    operations is torchao's (decoupled decay first, then the moments' lerp)."""
    p = p - h.lr * h.weight_decay * p
    m = m.lerp(g, 1 - h.beta1)
    v = v.lerp(g * g, 1 - h.beta2)
    return p - h.lr * (m / h.bc1) / (v.sqrt() / h.bc2_sqrt + h.eps), m, v


class AdamWFp8(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with FP8 block-quantized moments; see the module docstring.

    `grad_scale` (attribute, a one-element tensor or None): each gradient is divided by it as it is
    read, the convention of torch's fused AdamW.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale: torch.Tensor | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor of a floating-point parameter to its dtype, which
        would turn the uint8 codes into fp32 numbers (4x their memory): they go around it."""
        codes = {pid: {k: v for k, v in s.items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8}
                 for pid, s in state_dict["state"].items()}
        rest = {pid: {k: v for k, v in s.items() if k not in codes[pid]} for pid, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved, params):
            for key, value in codes.get(pid, {}).items():
                self.state[p][key] = value.to(p.device)
            if "step" in self.state[p]:  # on the host, wherever it was saved or moved (accelerate moves
                self.state[p]["step"] = self.state[p]["step"].cpu()  # state to the GPU): no sync to read it

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        if quantizes(p):
            blocks = p.numel() // BLOCK
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)  # e4m3 zero is 0x00
                state[name + "_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # the LR read once per group: a tensor LR on the GPU would sync per tensor
            group_scalars = dict(group, lr=float(group["lr"]))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                # the step is a CPU tensor: reading it never waits for the GPU
                hyper = AdamWStep.of(group_scalars, float(state["step"]))
                if "exp_avg_scale" not in state:
                    self._update_fp32(p, state, hyper)
                elif p.grad.stride() == p.stride() and p.numel() < 2**31 and fused_kernel_runs_on(p.device):
                    self._update_fused(p, state, hyper)  # (int32 offsets in the kernel)
                else:
                    self._update_torch(p, state, hyper)
        return loss

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        g = p.grad.float()
        return g if self.grad_scale is None else g / self.grad_scale.to(g.device)

    def _update_fp32(self, p, state, hyper) -> None:
        new_p, m, v = adamw_math(p.float(), self._grad(p), state["exp_avg"], state["exp_avg_sq"], hyper)
        p.copy_(new_p)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)

    def _update_torch(self, p, state, hyper) -> None:
        m = dequantize(state["exp_avg"], state["exp_avg_scale"])
        v = dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale"])
        flat = in_memory_order(p, p)
        new_p, m, v = adamw_math(flat.float(), in_memory_order(self._grad(p), p), m, v, hyper)
        flat.copy_(new_p)
        for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
            codes, scale = quantize(value)
            state[name].copy_(codes)
            state[name + "_scale"].copy_(scale)

    def _update_fused(self, p, state, hyper) -> None:
        kernel, rows = _triton_kernel(), 4
        blocks = p.numel() // BLOCK
        scale = None if self.grad_scale is None else self.grad_scale.to(p.device, torch.float32)
        kernel[(triton_cdiv(blocks, rows),)](
            in_memory_order(p, p), in_memory_order(p.grad, p), state["exp_avg"].view(FP8), state["exp_avg_scale"],
            state["exp_avg_sq"].view(FP8), state["exp_avg_sq_scale"], scale if scale is not None else p, blocks,
            # products of Python floats rounded once, as torch's ops receive them
            hyper.lr, 1 - hyper.beta1, 1 - hyper.beta2, hyper.eps, hyper.lr * hyper.weight_decay,
            hyper.bc1, hyper.bc2_sqrt, HAS_SCALE=scale is not None, ROWS=rows, BLOCK=BLOCK, num_warps=4)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def fused_kernel_runs_on(device: torch.device) -> bool:
    """Triton's e4m3 type exists from compute capability 8.9 on NVIDIA GPUs; not on ROCm."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and _triton_kernel() is not None


@functools.cache
def _triton_kernel():
    """The fused update as a Triton kernel, or None where Triton is not installed (CPU builds)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Triton kernels take only tensors and scalars (no dataclasses), hence the long parameter list.
    @triton.jit
    def adamw_fp8_kernel(p_ptr, g_ptr, m_ptr, m_scale_ptr, v_ptr, v_scale_ptr, gscale_ptr, n_blocks,
                         lr, w1, w2, eps, decay, bc1, bc2_sqrt,
                         HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
        live = rows < n_blocks
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK)
        mask = live[:, None]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(gscale_ptr))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(m_scale_ptr + rows, mask=live)[:, None]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(v_scale_ptr + rows, mask=live)[:, None]
        p = p - decay * p
        m = m + w1 * (g - m)  # torch's lerp rounds this way for weights below 0.5 (betas above 0.5)
        v = v + w2 * (g * g - v)
        # IEEE-rounded division and square root, as torch computes them (Triton's `/` and `sqrt`
        # are approximate): the codes then land where the torch ops put them.
        p = p - tl.div_rn(lr * tl.div_rn(m, bc1), tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(p_ptr + offs, p, mask=mask)
        m_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(m), axis=1), 1e-12), 448.0)
        v_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12), 448.0)
        tl.store(m_ptr + offs, tl.div_rn(m, m_scale[:, None]).to(tl.float8e4nv), mask=mask)
        tl.store(v_ptr + offs, tl.div_rn(v, v_scale[:, None]).to(tl.float8e4nv), mask=mask)
        tl.store(m_scale_ptr + rows, m_scale, mask=live)
        tl.store(v_scale_ptr + rows, v_scale, mask=live)

    return adamw_fp8_kernel
