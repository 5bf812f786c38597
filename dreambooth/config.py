"""Run configuration: one frozen dataclass per group, built from a preset, overrides and `--set` values.

Every check runs before any weights load, and all problems are reported together in one
`ConfigError` (torchtune's `config.validate` style). Help text sits next to each field; reading
the YAML side (presets, `--set` strings) is `config_files`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dreambooth.atomic import write_text
from dreambooth.config_files import parse_dotted, read_preset
from dreambooth.config_ranges import MANY, SEED_MAX, bound_problems, field_range, range_text
from dreambooth.data.decode import DEFAULT_MAX_PIXELS
from dreambooth.errors import ConfigError, Problem

SAMPLERS = ("dpmpp", "ddim", "pndm", "euler")  # the names `sampling.SAMPLER_CLASSES` maps to schedulers


def _f(default, help: str, lo=None, hi=None, *, above: bool = False, multiple: int | None = None):
    """A dataclass field with its help text and, for numbers, its allowed range (read by
    `describe_config`, enforced by `bound_problems`). `above`: lo itself is excluded."""
    metadata = {"help": help}
    if lo is not None:
        metadata["range"] = (lo, hi, above, multiple)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _failed(checks: list[tuple[bool, str, str]]) -> list[Problem]:
    """Problems of the (ok, where, message) checks that failed, in order."""
    return [Problem(where, message) for ok, where, message in checks if not ok]


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("tiny-random", "MODEL: diffusers folder, hub id, single file, or toy/tiny-random")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    prediction_type: str | None = _f(None, "override the scheduler's: epsilon or v_prediction")
    vae: str = _f("", "a diffusers AutoencoderKL folder or hub id used in place of the model's VAE, e.g. "
                  "madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE runs in fp32 under fp16; this one need not)")

    def problems(self) -> list[Problem]:
        return bound_problems("model", self) + _failed([
            (self.prediction_type in (None, "epsilon", "v_prediction"), "model.prediction_type",
             f"{self.prediction_type!r}: use epsilon or v_prediction"),
        ])


@dataclass(frozen=True)
class DataConfig:
    images: str = _f("", "folder with 3-10 photos of the subject")
    identifier: str = _f("sks", "rare token that will mean the subject")
    class_noun: str = _f("", "what the subject is: dog, toy, person, ...")
    instance_prompt: str = _f("a photo of {identifier} {class}", "prompt of the subject photos")
    class_prompt: str = _f("a photo of a {class}", "prompt of the class images (paper: 'a [class noun]')")
    resolution: int = _f(512, "training resolution in pixels (square)", 64, 2048, multiple=8)
    crop: str = _f("center", "center or random crop after resizing the short side")
    flip_prob: float = _f(0.5, "probability of a horizontal flip per example", 0, 1)
    max_pixels: int = _f(DEFAULT_MAX_PIXELS, "refuse images with more pixels (decompression bombs)", 0, 1_000_000_000,
                          above=True)
    masks: str = _f("none", "subject masks for the masked loss (train.mask_background_weight): none; alpha (each "
                            "photo's alpha channel); files (a sibling <photo stem>.mask.png, white = subject)")

    def problems(self) -> list[Problem]:
        return bound_problems("data", self) + _failed([
            (bool(self.class_noun.strip()), "data.class_noun",
             "is empty: say what the subject is, e.g. --class-noun dog"),
            (bool(self.identifier.strip()) and not any(c.isspace() for c in self.identifier), "data.identifier",
             f"{self.identifier!r} must be one word, e.g. sks"),
            ("{identifier}" in self.instance_prompt, "data.instance_prompt", "must contain {identifier}"),
            (self.crop in ("center", "random"), "data.crop", f"{self.crop!r}: use center or random"),
            (self.masks in MASK_SOURCES, "data.masks", f"{self.masks!r}: use {', '.join(MASK_SOURCES)}"),
        ])


@dataclass(frozen=True)
class PriorConfig:
    enabled: bool = _f(True, "prior-preservation loss on class images (Ruiz et al. eq. 2)")
    weight: float = _f(1.0, "lambda, the weight of the class-image loss", 0, 100)
    num_images: int = _f(200, "class images to generate and train on", 0, 10_000)
    negative_prompt: str = _f("", "negative prompt for class-image generation")
    steps: int = _f(25, "sampler steps per class image", 1, 1000)
    guidance: float = _f(7.5, "classifier-free guidance scale for class images", 0, 50)
    sampler: str = _f("dpmpp", f"one of {', '.join(SAMPLERS)}")
    batch_size: int = _f(4, "class images generated per batch", 1, 256)
    compile: bool = _f(False, "CUDA: torch.compile the UNet for class images (pays off for a few hundred images)")
    fast: bool = _f(False, "CUDA: class images from a copy of the UNet in the frozen dtype, replayed as CUDA "
                           "graphs (costs the copy's memory: SD 1.5 1.7 GB, SDXL 5.1 GB)")
    seed: int = _f(0, "seed of class image i is derived from (seed, i)", 0, SEED_MAX)
    cache: str = _f("", "class-image cache folder (default: ~/.cache/dreambooth/class-images)")

    def problems(self) -> list[Problem]:
        return bound_problems("prior", self) + _failed([
            (not self.enabled or self.num_images >= 1, "prior.num_images",
             f"{self.num_images}: need at least 1 with prior preservation"),
            (self.sampler in SAMPLERS, "prior.sampler", f"{self.sampler!r}: use one of {', '.join(SAMPLERS)}"),
        ])


@dataclass(frozen=True)
class TrainConfig:
    mode: str = _f("full", "full (fine-tune the UNet) or lora (adapters on the UNet)")
    steps: int = _f(800, "optimizer steps", 1, MANY)
    batch_size: int = _f(1, "subject images per step (as many class images are added)", 1, 256)
    grad_accum: int = _f(1, "gradient accumulation steps", 1, 1024)
    lr: float = _f(5e-6, "UNet learning rate (paper: 5e-6 full; LoRA wants ~1e-4)", 0, 1, above=True)
    lr_schedule: str = _f("constant", "constant, constant_with_warmup, linear or cosine")
    warmup_steps: int = _f(0, "learning-rate warm-up steps", 0, MANY)
    optimizer: str = _f("adamw", "adamw; adamwfp8 (FP8 moments: a quarter of AdamW's state memory); adamw8bit "
                                 "(bnb extra); adamw8bit_torchao or adamwfp8_torchao (lean extra)")
    weight_decay: float = _f(1e-2, "AdamW weight decay", 0, 1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", 0, 1000)
    train_text_encoder: bool = _f(False, "also fine-tune the text encoder")
    text_encoder_lr: float = _f(5e-6, "text-encoder learning rate", 0, 1, above=True)
    text_encoder_steps: int = _f(0, "stop training the text encoder after this step (0: never)", 0, MANY)
    lora_rank: int = _f(4, "LoRA rank", 1, 1024)
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / rank)", 0, 4096, above=True)
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters")
    mixed_precision: str = _f("auto", "auto (bf16 on GPUs with native bf16, compute capability 8.0+; fp16 "
                                          "with dynamic loss scaling on older GPUs; no on the CPU), no, fp16 or bf16")
    device: str = _f("auto", "where training runs (class images, latent caching, steps, samples, scoring): auto "
                             "(CUDA when available, else the CPU), cpu or cuda")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    checkpoint_levels: int = _f(0, "with gradient_checkpointing: recompute only the N highest-resolution UNet levels "
                                   "(their down and up blocks, where activations are largest); 0, or the UNet's "
                                   "number of levels or more: every block", 0, 64)
    cache_latents: bool = _f(True, "encode subject/class images once (VAE is frozen)")
    offload_frozen: bool = _f(False, "keep the VAE on the CPU while steps run (it comes back for samples and "
                                     "scoring) and a frozen text encoder on the CPU throughout, where it encodes "
                                     "the few prompts in fp32 (needs cached latents)")
    seed: int = _f(0, "seed of noise, timesteps and data order; step k's randomness depends on (seed, k)",
                   0, SEED_MAX)
    fast: str = _f("auto", "auto (with CUDA), always or never: the static-shape step of training/fast.py, same math")
    compile: str = _f("none", "torch.compile the UNet in the fast step: none, default, reduce-overhead or "
                              "max-autotune-no-cudagraphs (faster steps after minutes of compiling)")
    cuda_graph: bool = _f(True, "fast step on CUDA: replay forward+backward as one CUDA graph")
    weights: str = _f("fp32", "dtype of the weights a full fine-tune trains: fp32 (master weights), or bf16 (half "
                              "the weight and gradient memory; the optimizer rounds each update stochastically, so "
                              "updates far below bf16's resolution still move the weights on average; needs "
                              "mixed_precision bf16 and adamw8bit_torchao or adamwfp8_torchao)")
    channels_last: bool = _f(True, "CUDA only: UNet and VAE in channels-last memory layout (faster convolutions)")
    weight_copy: bool = _f(True, "fast step, full fine-tune under bf16 with adamw, no gradient checkpointing "
                                 "and no compile: the forward reads bf16 copies of the linear and convolution "
                                 "weights that the optimizer writes with each update (same arithmetic as autocast, "
                                 "without casting every weight on every step)")
    cudnn_benchmark: bool = _f(False, "CUDA: let cuDNN time every convolution algorithm on first use (slow first "
                                      "steps and first class-image batch, the same speed after them on an H200) "
                                      "instead of its heuristics")
    min_snr_gamma: float = _f(0.0, "min-SNR loss weighting (Hang et al. 2023), weight min(SNR, gamma) / SNR per row "
                                   "(v-prediction: / (SNR + 1)); 0: off, typical 5", 0, 1000)
    offset_noise: float = _f(0.0, "offset noise: add this times one normal draw per image and channel to the noise "
                                  "(darker darks, brighter brights); 0: off, typical 0.05-0.1", 0, 1)
    ema_decay: float = _f(0.0, "keep an exponential moving average of the trained weights (fp32, on the device) and "
                               "use it for samples, scoring and the exported model; 0: off, e.g. 0.999", 0, 1)
    mask_background_weight: float = _f(1.0, "with data.masks: loss weight of the subject photos' background (the "
                                            "subject weighs 1); 1: plain loss, 0: subject only", 0, 1)

    def problems(self) -> list[Problem]:
        return bound_problems("train", self) + _failed([
            (self.fast in ("auto", "always", "never"), "train.fast", f"{self.fast!r}: use auto, always or never"),
            (self.compile in COMPILE_MODES, "train.compile", f"{self.compile!r}: use {', '.join(COMPILE_MODES)}"),
            (self.mode in ("full", "lora"), "train.mode", f"{self.mode!r}: use full or lora"),
            (self.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
             f"{self.lr_schedule!r}: use {', '.join(LR_SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS, "train.optimizer", f"{self.optimizer!r}: use {', '.join(OPTIMIZERS)}"),
            (self.mixed_precision in ("auto", "no", "fp16", "bf16"), "train.mixed_precision",
             f"{self.mixed_precision!r}: use auto, no, fp16 or bf16"),
            (self.device in DEVICES, "train.device", f"{self.device!r}: use {', '.join(DEVICES)}"),
            (bool(self.lora_targets) and all(isinstance(t, str) and t.strip() for t in self.lora_targets),
             "train.lora_targets", f"{self.lora_targets!r}: give module names, e.g. [to_q, to_k, to_v, to_out.0]"),
            (not self.checkpoint_levels or self.gradient_checkpointing, "train.checkpoint_levels",
             f"{self.checkpoint_levels} has no effect without train.gradient_checkpointing=true"),
            (self.weights in ("fp32", "bf16"), "train.weights", f"{self.weights!r}: use fp32 or bf16"),
            (self.ema_decay < 1, "train.ema_decay", f"{self.ema_decay}: must be below 1 (1 would never move), "
             "e.g. 0.999, or 0 for no average"),
            *self._bf16_weight_problems(),
        ])

    def _bf16_weight_problems(self) -> list[tuple[bool, str, str]]:
        """bf16 weights round every update to 8 mantissa bits: AdamW's steps at lr 5e-6 would round
        to nothing, so only optimizers that round stochastically may train them."""
        if self.weights != "bf16":
            return []
        return [(self.mode == "full", "train.weights",
                 "bf16 is for full fine-tunes; LoRA adapters are small and train in fp32"),
                (self.optimizer.endswith("_torchao"), "train.weights",
                 f"bf16 weights need an optimizer that rounds stochastically: set train.optimizer to "
                 f"adamwfp8_torchao or adamw8bit_torchao (not {self.optimizer})"),
                (self.mixed_precision in ("auto", "bf16"), "train.weights",
                 f"bf16 weights need mixed_precision bf16 (not {self.mixed_precision})")]


@dataclass(frozen=True)
class OutputConfig:
    checkpoint_every: int = _f(500, "save a resumable checkpoint every N steps (0: only at the end)", 0, MANY)
    keep_checkpoints: int = _f(2, "keep the last K checkpoints", 1, 1000)
    sample_every: int = _f(0, "write a validation grid every N steps (0: only at the end)", 0, MANY)
    sample_prompts: list = _f(["a photo of {identifier} {class}", "a {identifier} {class} on the beach"],
                              "validation prompts")
    sample_images: int = _f(2, "validation images per prompt (0: no validation grids)", 0, 64)
    sample_steps: int = _f(25, "sampler steps of validation images", 1, 1000)
    log_every: int = _f(1, "write log.jsonl every N steps", 1, MANY)

    def problems(self) -> list[Problem]:
        return bound_problems("output", self) + _failed([
            (all(isinstance(p, str) for p in self.sample_prompts), "output.sample_prompts",
             f"{self.sample_prompts!r}: give a list of prompts"),
        ])


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(0, "score the model every N steps (0: never); see dreambooth.evaluation", 0, MANY)
    scorer: str = _f("standin", "oracle (toy world), features (DINO + CLIP) or standin (EfficientNet-Lite0)")
    subject: str = _f("", "toy-world subject name for the oracle (default: the class noun)")
    dino: str = _f("", "DINO ViT-S/16 folder or hub id (default facebook/dino-vits16)")
    clip: str = _f("", "CLIP folder or hub id (default openai/clip-vit-base-patch32)")
    num_prompts: int = _f(4, "prompts scored per evaluation", 1, 100)
    num_per_prompt: int = _f(2, "images per prompt per evaluation", 1, 64)
    num_class_images: int = _f(0, "class-prompt images per evaluation, for language drift and best's drift "
                               "limit (0: num_per_prompt; 4 images can only say 0, 25, 50 ... %)", 0, 256)
    select: str = _f("last", "last, or best: keep the scored checkpoint with the best trade-off in final/")
    min_prompt_fidelity: float = _f(0.75, "best: prompt fidelity must be at least this", 0, 1)
    max_drift: float = _f(0.10, "best: language drift must be at most this", 0, 1)

    def problems(self) -> list[Problem]:
        return bound_problems("eval", self) + _failed([
            (self.scorer in ("oracle", "features", "standin"), "eval.scorer",
             f"{self.scorer!r}: use oracle, features or standin"),
            (self.select in ("last", "best"), "eval.select", f"{self.select!r}: use last or best"),
            (self.select != "best" or bool(self.every), "eval.select",
             "best needs eval.every > 0 (e.g. --eval-every 100)"),
        ])


DEVICES = ("auto", "cpu", "cuda")
MASK_SOURCES = ("none", "alpha", "files")
OPTIMIZERS = ("adamw", "adamwfp8", "adamw8bit", "adamw8bit_torchao", "adamwfp8_torchao")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
GROUPS = {"model": ModelConfig, "data": DataConfig, "prior": PriorConfig, "train": TrainConfig,
          "output": OutputConfig, "eval": EvalConfig}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        problems = [p for name in GROUPS for p in getattr(self, name).problems()]
        if self.prior.enabled and "{identifier}" in self.data.class_prompt:
            problems.append(Problem("data.class_prompt",
                                    "must not contain {identifier}: class images show the plain class"))
        problems += _mask_problems(self.data, self.train)
        if problems:
            raise ConfigError(f"{len(problems)} problem(s) in the configuration", problems)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mask_problems(data: DataConfig, train: TrainConfig) -> list[Problem]:
    """Masks and their background weight act only together; either alone would be silently ignored."""
    weighted = train.mask_background_weight != 1
    return _failed([
        (data.masks != "none" or not weighted, "train.mask_background_weight",
         f"{train.mask_background_weight} needs masks: set data.masks to alpha or files"),
        (data.masks == "none" or weighted, "data.masks",
         f"{data.masks} has no effect while train.mask_background_weight is 1 (plain loss): set it below 1, "
         "e.g. 0.1, or data.masks=none"),
    ])


def load_config(preset: str | Path | None = None, overrides: dict | None = None,
                dotted: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Preset YAML, then `overrides` (a nested dict), then `key.sub=value` strings, in that order."""
    data: dict = {}
    problems: list[Problem] = []
    if preset:
        data = read_preset(preset)
    for src in [overrides or {}, parse_dotted(dotted, problems)]:
        for group, values in src.items():
            current = data.get(group)
            if isinstance(current, dict):
                current.update(values)
            elif current is None:  # absent, or an empty `group:` line
                data[group] = dict(values)
            # else: not a mapping; build_config names it
    return build_config(data, problems)


def build_config(data: dict, problems: list[Problem] | None = None) -> RunConfig:
    """Type-check every key against the dataclasses, then construct (which runs the value checks)."""
    problems = list(problems or [])
    groups = {}
    for group, values in data.items():
        cls = GROUPS.get(group)
        if cls is None:
            problems.append(Problem(group, f"unknown group; use one of {', '.join(GROUPS)}"))
            continue
        if values is not None and not isinstance(values, dict):
            problems.append(Problem(group, f"{values!r} is not a mapping of {group}.key: value"))
            continue
        groups[group] = _coerce_group(group, cls, values or {}, problems)
    try:  # keys with type errors were left out, so the value checks still see the rest
        config = RunConfig(**{g: GROUPS[g](**v) for g, v in groups.items()})
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the configuration", problems)
    return config


def _coerce_group(group: str, cls, values: dict, problems: list[Problem]) -> dict:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            problems.append(Problem(f"{group}.{key}", f"unknown key; {group} has: {', '.join(sorted(known))}"))
            continue
        if (group, key) == ("train", "mixed_precision") and value is False:
            value = "no"  # YAML 1.1 reads a bare `no` as False; this setting's choices include the word
        ok, coerced = _coerce(value, hints[key])
        if ok:
            out[key] = coerced
        elif isinstance(value, bool) and hints[key] is str:
            problems.append(Problem(f"{group}.{key}", f"{value!r} is not a valid str: YAML reads a bare yes, no, "
                                    "on, off, true or false as a boolean; quote it"))
        else:
            problems.append(Problem(f"{group}.{key}", f"{value!r} is not a valid {_type_name(hints[key])}"))
    return out


def _coerce(value, hint):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return True, None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if isinstance(value, (int, float)) else value
    if hint is int:  # 1e9 from JSON or YAML is a whole number too; its range is checked later
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool), str(value)
    if hint is list:
        return isinstance(value, list), value
    return True, value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def save_config(config: RunConfig, path: Path) -> None:
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_run_config(path: Path) -> RunConfig:
    """The config a run saved; a file that is not what `save_config` wrote is named as corrupt.

    A truncated file can still parse (as a shorter mapping, or with a cut value), and missing
    groups would then take their defaults and look like a changed configuration. `save_config`
    writes every group and ends the file with a newline, so both are required.
    """
    try:
        text = Path(path).read_text()
        saved = yaml.safe_load(text)
        bad = [g for g in GROUPS if not isinstance(saved, dict) or not isinstance(saved.get(g), dict)]
        bad += [] if text.endswith("\n") else ["the file ends mid-line"]
        config = None if bad else build_config(saved)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        bad = [f"YAML error: {str(e).splitlines()[0]}"]
    except ConfigError as e:
        bad = [f"{p.where}: {p.message}" for p in e.problems]
    if bad:
        raise ConfigError(f"the run's saved configuration {path} is unreadable or corrupt", [
            Problem(str(path), f"not a complete run config ({'; '.join(bad)}), e.g. truncated by a full "
                    "disk; restore it from a backup, or start a new run in another folder")])
    return config


def describe_config() -> str:
    """Every key with its default, help and allowed range, for `dreambooth train --help-config`."""
    lines = []
    for group, cls in GROUPS.items():
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = field_range(f)
            allowed = f" (range {range_text(bounds)})" if bounds else ""
            lines.append(f"{group}.{f.name} = {default!r}\n    {f.metadata.get('help', '')}{allowed}")
    return "\n".join(lines)
