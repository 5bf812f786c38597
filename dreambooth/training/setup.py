"""What trains and how: full vs LoRA (the only place that knows the difference), optimizer, LR schedule."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.utils.checkpoint

from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError, Problem
from dreambooth.sampling import use_tool_cache
from dreambooth.training.adamw_fp8 import AdamWFp8
from dreambooth.training.state import TEXT_ENCODER_NAMES, text_encoders_of
from dreambooth.training.weight_copy import AdamWCopies, CopiedModule

TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def mark_trainable(components, train: TrainConfig) -> dict[str, torch.nn.Module]:
    """Freeze what stays fixed, add LoRA adapters when asked; return {name: module} that train.

    `train.train_text_encoder` trains every text encoder the model has (SDXL: both).
    """
    for part in (components.vae, *components.text_encoders, components.unet):
        part.requires_grad_(False)
    modules = {"unet": components.unet}
    if train.train_text_encoder:
        modules.update(zip(TEXT_ENCODER_NAMES, components.text_encoders))
    text_encoders = text_encoders_of(modules)
    if train.mode == "full":
        for module in modules.values():
            module.requires_grad_(True)
    else:
        add_lora_adapters(components.unet, text_encoders, train)
    if components.is_xl and train.train_text_encoder:
        freeze_unused_layers(components.text_encoder)
    if train.gradient_checkpointing:
        enable_checkpointing(components.unet, text_encoders, train.checkpoint_levels)
    return modules


def freeze_unused_layers(text_encoder: torch.nn.Module) -> None:
    """Freeze SDXL's first text encoder past its penultimate layer: the UNet reads that layer's
    hidden states and the first encoder's pooled output is unused, so the last layer and the final
    norm never get a gradient. Trainable, they would only make a multi-GPU (DDP) run fail on
    parameters that took no part in the loss; on one process AdamW skips them anyway."""
    model = getattr(text_encoder, "text_model", text_encoder)
    for module in (model.encoder.layers[-1], model.final_layer_norm):
        module.requires_grad_(False)


def add_lora_adapters(unet: torch.nn.Module, text_encoders: tuple, train: TrainConfig) -> None:
    """LoRA adapters on the UNet's `train.lora_targets` and the text encoders' attention projections."""
    from peft import LoraConfig

    def lora(targets):
        return LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, init_lora_weights="gaussian",
                          target_modules=list(targets))

    with torch.random.fork_rng(devices=[]):  # adapter init depends on the run's seed alone
        torch.manual_seed(train.seed)
        try:
            unet.add_adapter(lora(train.lora_targets))
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError("train.lora_targets names no module of this UNet", [Problem(
                "train.lora_targets", f"{train.lora_targets!r}: {e}; the default is to_q, to_k, to_v, "
                "to_out.0 (attention projections)")]) from e
        for text_encoder in text_encoders:
            text_encoder.add_adapter(lora(TEXT_ENCODER_LORA_TARGETS))


def enable_checkpointing(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module] = (),
                         levels: int = 0) -> None:
    """Activation checkpointing; without dropout the recomputation draws no random numbers, so the
    RNG state need not be saved and restored (which a CUDA graph capture cannot do).

    `levels` > 0: only the UNet's `levels` highest-resolution down blocks and the matching up blocks
    recompute (they hold most of the activations for a smaller share of the arithmetic); the inner
    levels and the mid block keep their activations. As many levels as the UNet has, or more,
    recompute everything, mid block included (= 0). Each text encoder given recomputes too.
    """
    keep_rng = any(_has_dropout(m) for m in (unet, *text_encoders))
    kwargs = {"use_reentrant": False, "preserve_rng_state": keep_rng}
    unet.enable_gradient_checkpointing(lambda module, *args: torch.utils.checkpoint.checkpoint(module, *args, **kwargs))
    if 0 < levels < len(unet.down_blocks):
        inner = [*unet.down_blocks[levels:], unet.mid_block, *unet.up_blocks[:len(unet.up_blocks) - levels]]
        for module in (m for block in inner if block is not None for m in block.modules()):
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
    for text_encoder in text_encoders:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _has_dropout(module: torch.nn.Module) -> bool:
    """Dropout layers, or attention that passes a float `dropout` to SDPA (CLIP), with p > 0."""
    def p(m):
        return m.p if isinstance(m, torch.nn.Dropout) else vars(m).get("dropout", 0.0)
    return any(isinstance(p(m), float) and p(m) > 0 for m in module.modules())


def count_trainable(modules: dict[str, torch.nn.Module]) -> int:
    return sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)


def make_optimizer(modules: dict[str, torch.nn.Module], train: TrainConfig, device: torch.device, flats=None):
    """AdamW over one parameter group per module (the text encoders have their own learning rate).

    `flats` ({name: flat.FlatModule}): the group holds chunks of the module's flat buffer instead;
    ({name: weight_copy.CopiedModule}): its buffers, updated by `weight_copy.AdamWCopies`.
    """
    groups = []
    for name, module in modules.items():
        params = flats[name].params if flats else [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": train.text_encoder_lr if name in TEXT_ENCODER_NAMES else train.lr})
    kwargs = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=train.weight_decay)
    if flats and all(isinstance(f, CopiedModule) for f in flats.values()):
        return AdamWCopies(groups, list(flats.values()), **kwargs)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes",
                              [Problem("train.optimizer",
                                       "pip install 'dreambooth[bnb]' (CUDA only), or use adamw")]) from e
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if train.optimizer == "adamwfp8":
        return AdamWFp8(groups, **kwargs)
    if train.optimizer in TORCHAO_OPTIMIZERS:
        if train.weights == "bf16":
            kwargs["bf16_stochastic_round"] = True  # see TrainConfig.weights
        return torchao_adamw(train.optimizer, groups, kwargs)
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for all parameters instead of one per tensor
    return torch.optim.AdamW(groups, **kwargs)


TORCHAO_OPTIMIZERS = {"adamw8bit_torchao": "AdamW8bit", "adamwfp8_torchao": "AdamWFp8"}


def torchao_adamw(name: str, groups: list[dict], kwargs: dict):
    """torchao's low-bit AdamW, states quantized in blocks of 256 and updated by one compiled kernel
    per parameter tensor, without bitsandbytes' device sync after each tensor.

    adamw8bit_torchao: bitsandbytes' dynamic-map 8-bit states; quantizing looks each value up in a
    256-entry map. adamwfp8_torchao: FP8 (e4m3) states with a scale per block, a plain cast, so the
    update moves about as many bytes and does far less arithmetic; the same memory; its rounding
    of small second moments is coarser (e4m3 spans ~2e5 below each block's largest value).

    Either keeps quantized states only for tensors of at least 4096 elements whose size is a
    multiple of 256 (flat buffers are padded to whole 256-blocks, training/flat.py); others keep
    fp32 states. It turns each group's learning rate into a CPU scalar tensor, which the LR
    scheduler updates in place, so on the fast path reading it never waits for the GPU (the plain
    path's `accelerator.prepare` moves it to the device; that path waits every step anyway).
    """
    # Its import reports every prebuilt CUDA kernel that does not load with this torch build
    # (quantization kernels these optimizers do not use).
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao.optim
    except ImportError as e:
        raise ConfigError(f"train.optimizer={name} needs torchao",
                          [Problem("train.optimizer", "pip install 'dreambooth[lean]', or use adamw")]) from e
    finally:
        quiet.setLevel(level)
    use_tool_cache()  # its kernel compiles on the first step; the cache makes later runs start sooner
    return getattr(torchao.optim, TORCHAO_OPTIMIZERS[name])(groups, **kwargs)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    warm = train.warmup_steps
    if warm and step < warm and train.lr_schedule != "constant":
        return (step + 1) / warm
    if train.lr_schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warm) / max(1, train.steps - warm))
    if train.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_lr_schedule(optimizer, modules: dict[str, torch.nn.Module], train: TrainConfig):
    """One lambda per group; the text encoders' drop to 0 after `text_encoder_steps`."""
    def for_group(name):
        def factor(step):
            if name in TEXT_ENCODER_NAMES and train.text_encoder_steps and step >= train.text_encoder_steps:
                return 0.0
            return lr_factor(step, train)
        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(n) for n in modules])
