"""What a training run holds while its steps run: one `TrainState`, built by `training.prepare`.

The step functions (`step.PlainStep`, `fast.FastStep`) and the loop (`loop.run_steps`) read
everything from it, so none of them takes a dozen loose arguments.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from dreambooth.config import RunConfig
from dreambooth.prompts import fill_prompt
from dreambooth.ranks import Ranks
from dreambooth.rundir import RunDir
from dreambooth.training.batches import LatentSource, latents_cached
from dreambooth.training.ema import WeightAverage
from dreambooth.training.memory import PhaseMeter
from dreambooth.training.scaling import LossScaler
from dreambooth.training.scoring import CheckpointScoring


def text_encoders_stay_on_cpu(config: RunConfig, device: torch.device) -> bool:
    """`train.offload_frozen` on CUDA with frozen text encoders: they never go to the card. They
    encode a few prompts per run (subject and class prompt, the class images' prompt once, the
    validation prompts) on the CPU in fp32, so the card never holds them beside the UNet (SDXL: 1.6 GB
    in bf16 beside 5.1 GB). Moving the UNet out instead would break the fast step's CUDA graph,
    which holds the addresses of its weights."""
    return (config.train.offload_frozen and device.type == "cuda" and not config.train.train_text_encoder
            and latents_cached(config))


class FrozenParking:
    """`train.offload_frozen`: the frozen VAE (and text encoder) wait on the CPU while steps run.

    The steps never call them once latents and prompt embeddings are cached; samples, scoring and
    the end of training bring them back (`back()`). Nothing moves unless asked, nor when latents are
    not cached (the random-crop step encodes every batch). Text encoders that stay on the CPU
    (`text_encoders_stay_on_cpu`) are not moved at all.
    """

    def __init__(self, components, config: RunConfig, device: torch.device, park_to: str = "cpu"):
        encoders = config.train.train_text_encoder or text_encoders_stay_on_cpu(config, device)
        frozen = [components.vae] + ([] if encoders else list(components.text_encoders))
        self.modules = frozen if config.train.offload_frozen and latents_cached(config) else []
        self.device, self.park_to = device, park_to

    def park(self) -> None:
        for module in self.modules:
            module.to(self.park_to)

    @contextlib.contextmanager
    def back(self):
        for module in self.modules:
            module.to(self.device)
        try:
            yield
        finally:
            self.park()


TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def text_encoders_of(modules: dict[str, torch.nn.Module]) -> tuple[torch.nn.Module, ...]:
    """The text encoders among `modules`, first then second (none when they are frozen)."""
    return tuple(modules[name] for name in TEXT_ENCODER_NAMES if name in modules)


class PromptEmbeddings:
    """Text-encoder outputs for the subject and class prompts; computed once when they are frozen.

    SD 1.x/2.x: the encoder's last hidden state (2, 77, D). SDXL (what its pipeline's
    `encode_prompt` computes): both encoders' penultimate hidden states side by side
    (2, 77, D1 + D2), and the second encoder's projected pooled output (2, P), which the UNet
    takes with the micro-conditioning as added conditions.
    """

    def __init__(self, components, config: RunConfig, device: torch.device, dtype: torch.dtype | None = None):
        data = config.data
        texts = [fill_prompt(data.instance_prompt, data.identifier, data.class_noun),
                 fill_prompt(data.class_prompt, data.identifier, data.class_noun)]
        self.all_ids = [tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device) for tok in components.tokenizers]  # (2, 77) each
        self.ids = self.all_ids[0]
        self.xl = components.is_xl
        self.frozen = None
        if not config.train.train_text_encoder:  # encoded where the encoders are (the CPU: see FrozenParking)
            where = next(components.text_encoder.parameters()).device
            with torch.no_grad():
                context, pooled = self.encode(components.text_encoders, [ids.to(where) for ids in self.all_ids])
            self.frozen = tuple(None if t is None else t.to(device, dtype or t.dtype) for t in (context, pooled))

    def encode(self, text_encoders, all_ids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (2, 77, D), pooled (2, P) or None for SD 1.x/2.x) from the given encoders."""
        all_ids = all_ids or self.all_ids
        if not self.xl:
            return text_encoders[0](all_ids[0])[0], None
        outputs = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(text_encoders, all_ids)]
        return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1), outputs[-1].text_embeds

    def batch(self, is_prior: torch.Tensor, text_encoders) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's context and pooled embedding (None for SD 1.x/2.x): subject or class prompt."""
        return self.rows(is_prior.long().to(self.ids.device), text_encoders)

    def rows(self, index: torch.Tensor, text_encoders) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, pooled = self.frozen if self.frozen is not None else self.encode(text_encoders)
        return context[index], None if pooled is None else pooled[index]


def added_conditions(pooled: torch.Tensor | None, time_ids: torch.Tensor) -> dict | None:
    """The SDXL UNet's `added_cond_kwargs` (None for SD 1.x/2.x, whose UNet takes none)."""
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device)}


@dataclass
class TrainState:
    """A prepared run: models on their device, optimizer and schedule (restored when resumed), the
    latent sources and prompt embeddings, and the flags that pick the step function.

    `modules` are the bare trainable modules ({"unet": ..., "text_encoder": ..., and for SDXL
    "text_encoder_2": ...}); `wrapped` the
    same as the plain step calls them (through `accelerator.prepare`; the bare ones on the fast step).
    `start` is the number of steps already done (> 0 when resumed). With `lag` > 0 the loop reads
    the losses of a step that many steps late (the fast step on CUDA).
    """

    config: RunConfig
    run: RunDir
    components: object  # models.Components
    accelerator: object  # accelerate.Accelerator
    modules: dict[str, torch.nn.Module]
    wrapped: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    instances: LatentSource
    classes: LatentSource | None
    prompts: PromptEmbeddings
    parking: FrozenParking
    scoring: CheckpointScoring | None = None
    flats: dict | None = None  # {name: flat.FlatModule} when the optimizer trains flat buffers
    scaler: LossScaler | None = None  # fp16: the dynamic loss scaler both step functions use
    ema: WeightAverage | None = None  # train.ema_decay: the weights' moving average, updated by the loop
    start: int = 0
    fast: bool = False
    lag: int = 0
    meter: PhaseMeter = field(default_factory=PhaseMeter)  # per-phase peak memory, logged
    ranks: Ranks = Ranks()  # the run's processes; rank 0 alone writes the run directory

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def mixed_precision(self) -> str:
        """fp16 is the one precision accelerate is not told about: the steps scale it themselves."""
        return "fp16" if self.scaler is not None else self.accelerator.mixed_precision

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self.modules

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The trained text encoders as the plain step calls them (empty when they are frozen)."""
        return text_encoders_of(self.wrapped)

    def averaged(self):
        """A context in which the modules hold the weight average (train.ema_decay), for samples and
        scoring; without one the trained weights themselves."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    @property
    def seed(self) -> int:
        """The seed of the step draws: the same in every process, which each build the global batch's
        draws and take their own rows of it (`batches.build_batch`)."""
        return self.config.train.seed
