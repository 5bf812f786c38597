"""bf16 compute copies of the weights a full fine-tune trains, written by the optimizer (`train.weight_copy`).

Under bf16 autocast every convolution and linear layer casts its fp32 weight to bf16 on each forward
(and the backward casts the bf16 weight gradient back to fp32): two passes over the UNet's weights per
step, about 700 small kernels each way, plus fp32 gradients that fused AdamW then reads. Here those
layers' weights and biases sit in one flat fp32 buffer per module (the masters), beside one flat bf16
buffer of copies laid out the same way. The forward runs with the copies in place of the masters
(torch's `stateless._reparametrize_module`, what `torch.func.functional_call` uses, still under
autocast), so autograd leaves bf16 gradients
in a flat bf16 buffer; one fused kernel then reads each master, its bf16 gradient and the moments,
writes them back, and writes the new bf16 copy. The arithmetic is autocast's: the copy is the master
rounded to nearest as autocast's cast is, and the gradient is the same bf16 product autocast would have
upcast. Normalisation and embedding weights, which autocast keeps in fp32, train as before (a second
flat buffer with fp32 gradients, the same kernel without the copy).

Parameter groups, state (`step`, `exp_avg`, `exp_avg_sq`) and the update follow torch's fused AdamW;
the kernel needs Triton and CUDA, elsewhere the same update runs as torch ops (tests).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from dreambooth.training.adamw_fp8 import AdamWStep, triton_cdiv
from dreambooth.training.flat import is_dense

CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # their weight and bias: cast to bf16 by autocast
ELEMENTS_PER_PROGRAM = 1024  # with 4 warps: 7.7 ms over SD 1.5's 860 M weights on an H200 (2048 / 8: 11.5 ms)


def copies_apply(config, fast: bool, precision: str, device: torch.device) -> bool:
    """Whether this run trains through weight copies: the fast step (on by default with CUDA), a full
    fine-tune of fp32 weights under bf16 with AdamW, no activation checkpointing (its recomputed
    forward would run outside the call that puts the copies in place), no torch.compile (not
    measured with swapped parameters), and on CUDA the Triton kernel (the torch-op fallback would
    allocate fp32 temporaries the size of the model)."""
    train = config.train
    kernel = device.type != "cuda" or _triton_kernel() is not None
    return (train.weight_copy and fast and kernel and precision == "bf16" and train.mode == "full"
            and train.compile == "none" and train.weights == "fp32" and train.optimizer == "adamw"
            and not train.gradient_checkpointing)


def cast_by_autocast(module: nn.Module) -> set[str]:
    """Names of the trainable parameters that autocast casts to the low dtype (weights and biases of
    linear and convolution layers)."""
    names = set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, CAST_LAYERS):
            for name, p in layer.named_parameters(recurse=False):
                if p.requires_grad:
                    names.add(f"{prefix}.{name}" if prefix else name)
    return names


class _Flat:
    """Parameters (name, tensor) of one module as views of one fp32 buffer (`data`), with a gradient
    buffer of `grad_dtype` laid out the same way; with `copy`, a buffer of bf16 copies too, whose views
    (`views`) the forward uses in place of the parameters. Each view keeps its parameter's strides;
    `places` gives each parameter's (offset, shape, strides) in the buffers."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], grad_dtype: torch.dtype, copy: bool):
        device = named[0][1].device
        total = sum(p.numel() for _, p in named)
        self.data = torch.zeros(total, dtype=torch.float32, device=device)
        self.grad = torch.zeros(total, dtype=grad_dtype, device=device)
        self.copy = torch.zeros(total, dtype=torch.bfloat16, device=device) if copy else None
        self.views: dict[str, torch.Tensor] = {}
        self.places: dict[str, tuple] = {}
        offset = 0
        for name, p in named:
            if not is_dense(p):
                raise ValueError(f"parameter {name} of shape {tuple(p.shape)} is not dense in memory")
            self.places[name] = (offset, tuple(p.shape), p.stride())
            view = torch.as_strided(self.data, p.shape, p.stride(), offset)
            view.copy_(p.detach())
            p.data = view
            grad = torch.as_strided(self.grad, p.shape, p.stride(), offset)
            if copy:
                leaf = torch.as_strided(self.copy, p.shape, p.stride(), offset).detach().requires_grad_()
                leaf.grad = grad  # autograd adds into it in place (the buffer is zeroed before each backward)
                self.views[name] = leaf
            else:
                p.grad = grad
            offset += p.numel()
        # what the optimizer holds: the whole buffer as one tensor (its gradient is `grad`, which may
        # be bf16, so it is not the parameter's `.grad`)
        self.param = nn.Parameter(self.data)
        self.refresh()

    def refresh(self) -> None:
        """The copies from the masters (after a checkpoint was loaded into them)."""
        if self.copy is not None:
            self.copy.copy_(self.data)


class CopiedModule:
    """One trained module's two flat buffers: `cast` (weights autocast casts, with bf16 copies and bf16
    gradients) and `kept` (the rest, fp32 gradients); either is None when it would be empty.
    `layout` places each trainable parameter, in the module's order (a per-tensor optimizer's), in
    its buffer: (flat, offset, shape, strides)."""

    def __init__(self, module: nn.Module):
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("module has no trainable parameters")
        cast = cast_by_autocast(module)
        casts = [(n, p) for n, p in params if n in cast]
        rest = [(n, p) for n, p in params if n not in cast]
        self.cast = _Flat(casts, torch.bfloat16, copy=True) if casts else None
        self.kept = _Flat(rest, torch.float32, copy=False) if rest else None
        self.flats = [f for f in (self.cast, self.kept) if f is not None]
        self.layout = []
        for n, _ in params:
            flat = self.cast if n in cast else self.kept
            self.layout.append((flat, *flat.places[n]))

    @property
    def params(self) -> list[nn.Parameter]:
        return [f.param for f in self.flats]

    @property
    def grads(self) -> list[torch.Tensor]:
        return [f.grad for f in self.flats]

    @property
    def views(self) -> dict[str, torch.Tensor]:
        """The bf16 copies by parameter name (none once released)."""
        return self.cast.views if self.cast is not None else {}

    def refresh(self) -> None:
        if self.cast is not None:
            self.cast.refresh()

    def release(self) -> None:
        """Drop the gradient and copy buffers (training is over; samples and saves read the masters)."""
        for flat in self.flats:
            flat.grad = flat.copy = None
            flat.views.clear()


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients, accumulated in fp32 whatever their dtype (a device tensor)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def copy_modules(modules: dict[str, nn.Module]) -> dict[str, CopiedModule]:
    return {name: CopiedModule(module) for name, module in modules.items()}


@contextlib.contextmanager
def copies_in_place(modules: dict[str, nn.Module], copied: dict[str, CopiedModule]):
    """Within it, calls of the modules (forward and backward) use the bf16 copies of their cast weights."""
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            stack.enter_context(torch.nn.utils.stateless._reparametrize_module(module, copied[name].views))
        yield


class AdamWCopies(torch.optim.Optimizer):
    """AdamW (torch's fused AdamW arithmetic) over `CopiedModule` buffers: param groups as
    `make_optimizer` builds them, each holding its modules' flat buffers. Updating a buffer that has
    copies writes them too. `grad_scale` (attribute, a one-element tensor or None): each gradient is
    divided by it as it is read, as in torch's fused AdamW (gradient clipping folded in)."""

    def __init__(self, groups: list[dict], modules: list[CopiedModule], lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2):
        """`groups[i]` holds the buffers of `modules[i]`."""
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.modules = modules
        self.flats = {flat.param: flat for module in modules for flat in module.flats}  # `copy`: bf16 copies or None
        self.grad_scale: torch.Tensor | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the per-tensor state of torch's AdamW over the same modules (a run started
        without weight copies): each tensor's moments go to its place in the flat buffers."""
        if self._per_tensor(state_dict):
            state_dict = self._flattened(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].numel() != p.numel():  # the kernel indexes by p's size
                        raise ValueError(f"optimizer state {key} holds {state[key].numel()} values for a buffer of "
                                         f"{p.numel()}")
                if "step" in state:  # a host scalar: reading it never waits for the GPU
                    state["step"] = state["step"].cpu()

    def _per_tensor(self, state_dict: dict) -> bool:
        saved = state_dict["param_groups"]
        return len(saved) == len(self.modules) and any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)) and all(
            len(s["params"]) == len(m.layout) for s, m in zip(saved, self.modules))

    def _flattened(self, state_dict: dict) -> dict:
        """`state_dict` with this optimizer's parameters: each group's flat buffers, numbered in order."""
        state, groups, index = {}, [], 0
        for saved, module in zip(state_dict["param_groups"], self.modules):
            moments = {id(f): {k: torch.zeros_like(f.data) for k in ("exp_avg", "exp_avg_sq")} for f in module.flats}
            steps = []
            for pid, (flat, offset, shape, stride) in zip(saved["params"], module.layout):
                old = state_dict["state"].get(pid)
                if not old:  # never stepped: zero moments
                    continue
                steps.append(float(old["step"]))
                for key, buffer in moments[id(flat)].items():
                    torch.as_strided(buffer, shape, stride, offset).copy_(old[key])
            groups.append(dict(saved, params=list(range(index, index + len(module.flats)))))
            for flat in module.flats:
                if steps:
                    state[index] = {"step": torch.tensor(max(steps)), **moments[id(flat)]}
                index += 1
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])  # read once: a tensor LR on the GPU would sync
            for p in group["params"]:
                grad = self.flats[p].grad
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                hyper = AdamWStep.of(dict(group, lr=lr), float(state["step"]))
                update(p, grad, state["exp_avg"], state["exp_avg_sq"], self.flats[p].copy, self.grad_scale, hyper)
        return loss


def update(p, g, m, v, copy, grad_scale, h: AdamWStep) -> None:
    """One AdamW step of flat fp32 `p` (moments `m`, `v`) from gradient `g` (bf16 or fp32), divided by
    `grad_scale` when given; `copy` (bf16, or None) gets the new weights rounded to nearest."""
    if p.is_cuda and _triton_kernel() is not None:
        kernel = _triton_kernel()
        scale = grad_scale.to(p.device, torch.float32) if grad_scale is not None else p
        kernel[(triton_cdiv(p.numel(), ELEMENTS_PER_PROGRAM),)](
            p, g, m, v, copy if copy is not None else p, scale, p.numel(),
            h.lr, h.beta1, h.beta2, h.eps, h.lr * h.weight_decay, h.lr / h.bc1, h.bc2_sqrt,
            HAS_COPY=copy is not None, HAS_SCALE=grad_scale is not None, BLOCK=ELEMENTS_PER_PROGRAM, num_warps=4)
        return
    g = g.float()
    if grad_scale is not None:
        g = g / grad_scale.to(g.device)
    p.mul_(1 - h.lr * h.weight_decay)
    m.lerp_(g, 1 - h.beta1)
    v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    p.addcdiv_(m, v.sqrt().div_(h.bc2_sqrt).add_(h.eps), value=-h.lr / h.bc1)
    if copy is not None:
        copy.copy_(p)


@functools.cache
def _triton_kernel():
    """The fused update as a Triton kernel, or None where Triton is not installed (CPU builds)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def adamw_copy_kernel(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, gscale_ptr, n, lr, beta1, beta2, eps, decay,
                          step_size, bc2_sqrt, HAS_COPY: tl.constexpr, HAS_SCALE: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # buffers past 2**31 elements
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if HAS_SCALE:  # one division per program, a product per element (within an ulp of g / scale)
            g = g * (1.0 / tl.load(gscale_ptr))
        # torch's fused AdamW: decoupled decay, the moments, then the bias-corrected step, with
        # IEEE-rounded division and square root (Triton's `/` and `sqrt` are approximate)
        p = p - decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_COPY:
            tl.store(c_ptr + offs, p.to(tl.bfloat16), mask=mask)

    return adamw_copy_kernel
