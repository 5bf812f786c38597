"""The UNet that class images are sampled with on CUDA (`prior.fast`): a copy in the sampling
dtype, replayed through CUDA graphs.

Before a full fine-tune the UNet holds fp32 master weights. Sampled under autocast, every layer's
weight is cast on each call and GroupNorm runs in fp32 between bf16 convolutions (autocast's rule
for normalisations), so activations go back and forth between dtypes. A bf16 (fp16 card: fp16) copy
of the weights, in the UNet's memory layout, computes the same images to that dtype's rounding, as
the pipeline of a bf16 model would. One denoising step has the same shapes each time, so after two
warm-up calls its kernels are captured once per batch shape and replayed: no Python or launch gaps
between the UNet's ~1,000 kernels. The copy costs the UNet's size in that dtype (SD 1.5: 1.7 GB,
SDXL: 5.1 GB) and the graph's activations; presets for large cards turn it on.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_CALLS = 2  # eager calls per shape before capture (cuDNN picks its algorithms on the first)


class GraphedUNet(nn.Module):
    """Calls `unet` through one CUDA graph per input signature (shapes, dtypes, which optional
    arguments are given); looks like the UNet to a diffusers pipeline (config, dtype, device and
    every other attribute are the UNet's).

    The pipeline's timestep is an on-device tensor, copied into the graph's input like the
    latents and embeddings. Outputs are copies, so a scheduler may keep them across steps.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.inner = unet
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    @property
    def captured(self) -> int:
        """How many input signatures have a graph."""
        return sum(1 for c in self._graphs.values() if c.graph is not None)

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or not sample.is_cuda or torch.is_grad_enabled():
            return self.inner(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        inputs = {"sample": sample, "timestep": _as_tensor(timestep, sample.device),
                  "encoder_hidden_states": encoder_hidden_states, **kwargs}
        signature = _signature(inputs)
        captured = self._graphs.get(signature)
        if captured is None:
            captured = self._graphs[signature] = _Captured(self.inner)
        out = captured(inputs, self._shared_pool())
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _shared_pool(self):
        """One memory pool for all of this UNet's graphs: batches of several shapes (a shorter last
        batch) reuse the same activation memory instead of each holding its own."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


class _Captured:
    """One signature's static inputs, graph and output; eager until `WARMUP_CALLS` calls are done."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.calls = 0
        self.graph = None
        self.static = None
        self.output = None

    def __call__(self, inputs: dict, pool) -> torch.Tensor:
        if self.graph is not None:
            _copy_into(self.static, inputs)
            self.graph.replay()
            return self.output.clone()
        self.calls += 1
        if self.calls <= WARMUP_CALLS:
            return _run(self.unet, inputs)
        self.static = _cloned(inputs)
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = _run(self.unet, self.static)
        self.graph.replay()  # capture records the kernels without running them
        return self.output.clone()


def _run(unet: nn.Module, inputs: dict) -> torch.Tensor:
    named = dict(inputs)
    return unet(named.pop("sample"), named.pop("timestep"), named.pop("encoder_hidden_states"),
                return_dict=False, **named)[0]


def _as_tensor(timestep, device: torch.device) -> torch.Tensor:
    """The timestep as a tensor on the device (the pipeline passes one; a plain number is moved)."""
    return timestep.to(device) if torch.is_tensor(timestep) else torch.tensor(timestep, device=device)


def _signature(value) -> tuple:
    """What a graph is specific to: every tensor's shape, dtype and device, and the fixed values."""
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_signature(v) for v in value))
    return ("value", value)


def _cloned(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _copy_into(static, value) -> None:
    if torch.is_tensor(static):
        static.copy_(value)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], value[k])
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)


def sampling_unet(unet: nn.Module, dtype: torch.dtype) -> GraphedUNet:
    """The UNet to sample class images with on CUDA: `unet` itself when it is already in `dtype`,
    else a frozen copy in `dtype` (same memory layout), behind CUDA graphs."""
    if unet.dtype != dtype:
        unet = _copy_in(unet, dtype)
    return GraphedUNet(unet.eval())


def _copy_in(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `unet` with its weights in `dtype`, made weight by weight: no second full-precision
    copy on the card on the way."""
    if not hasattr(unet, "from_config"):  # not a diffusers model: copy, then cast
        return copy.deepcopy(unet).to(dtype).requires_grad_(False)
    with torch.device("meta"):
        clone = type(unet).from_config(unet.config)
    weights = {k: v.detach().to(dtype, copy=True) if v.is_floating_point() else v.detach().clone()
               for k, v in unet.state_dict().items()}
    clone.load_state_dict(weights, assign=True)
    return clone.requires_grad_(False)
