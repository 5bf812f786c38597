"""Export a finished run in the formats other tools read, in one step.

    diffusers     complete pipeline folder (safetensors), `StableDiffusionPipeline.from_pretrained`;
                  fp32 weights plus an `fp16` (or `bf16`) variant, as diffusers' own repos ship them
    single-file   one .safetensors in the original SD key layout (A1111, ComfyUI, `from_single_file`);
                  an SD 2 v-prediction model gets the `<stem>.yaml` config A1111 and Forge look for
    lora-kohya    LoRA weights in the kohya sd-scripts layout (A1111, Forge, ComfyUI, diffusers);
                  the default LoRA format (`lora` names it)
    lora-peft     LoRA weights as diffusers saves them (`load_lora_weights`), alpha in the metadata;
                  only diffusers reads this layout

A LoRA run exported as diffusers or single-file has its LoRA merged into the base weights. Every
export describes itself (`formats.metadata`), is written under a temporary name and moved into place
when complete (`formats.writing`), and never replaces an existing path. All exporters share one
signature: `(source: ExportSource, output: Path, dtype: torch.dtype) -> Path`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import yaml

from dreambooth.atomic import prune_stale_temporaries
from dreambooth.errors import ConfigError, Problem, raise_if_errors
from dreambooth.formats.config_folders import CONFIGS_METADATA_KEY
from dreambooth.formats.lora import adapter_metadata, merge_lora, peft_to_kohya, read_lora_file, to_peft_layout
from dreambooth.formats.metadata import STABILITY_IMPL, export_metadata, kohya_metadata, ldm_inference_config
from dreambooth.formats.single_file import pipeline_to_original
from dreambooth.formats.text_layouts import text_family
from dreambooth.formats.writing import (
    ExportError,  # noqa: F401  (re-exported: callers of export() catch it here)
    named_write_errors,
    write_file_atomically,
    write_folder_atomically,
)
from dreambooth.models import detect_source, load_components, model_folder
from dreambooth.rundir import RUN_INFO, RunDir
from dreambooth.training.outputs import save_pipeline_folder, write_text_encoder

FORMATS = ("diffusers", "single-file", "lora-kohya", "lora-peft")
ALIASES = {"lora": "lora-kohya"}  # the LoRA layout every reader loads
FORMAT_CHOICES = FORMATS + tuple(ALIASES)  # every name `export` accepts
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # name -> weights dtype
DEFAULT_DTYPE = "fp16"
VARIANTS = {torch.float16: "fp16", torch.bfloat16: "bf16"}  # diffusers variant names of the folder export
LORA_FILE = "pytorch_lora_weights.safetensors"  # what training writes in final/ for LoRA runs
LORA_PARTS = ("unet", "text_encoder", "text_encoder_2")  # the last: SDXL only


@dataclass(frozen=True)
class ExportSource:
    """A finished run as the exporters see it: final/, its dreambooth.json and the resolved config."""

    run: RunDir
    info: dict
    config: dict

    @property
    def is_lora(self) -> bool:
        return self.info["mode"] == "lora"

    @property
    def lora_file(self) -> Path:
        return self.run.final / LORA_FILE

    def alphas(self) -> dict[str, float]:
        alpha = float(self.config.get("train", {}).get("lora_alpha", 0) or 0)
        return {part: alpha for part in LORA_PARTS}  # training uses one alpha for every part

    def model_folder(self) -> Path:
        """The diffusers folder with the run's architecture: final/, or a LoRA run's base model."""
        return self.run.final if not self.is_lora else model_folder(detect_source(str(self.info["base_model"])))

    def family(self) -> str:
        """sd1, sd2 or sdxl: what the metadata and the kohya layout depend on."""
        folder = self.model_folder()
        if (folder / "text_encoder_2").is_dir():
            return "sdxl"
        return text_family(json.loads((folder / "text_encoder" / "config.json").read_text()))

    def metadata(self, *, lora: bool, implementation: str = "diffusers") -> dict[str, str]:
        return export_metadata(self.info, self.config, self.family(), lora=lora, implementation=implementation)

    def lora_metadata(self, output: Path, implementation: str) -> dict[str, str]:
        """The common block plus the kohya `ss_*` keys that A1111 and Forge list LoRAs by."""
        return {**self.metadata(lora=True, implementation=implementation),
                **kohya_metadata(self.info, self.config, self.family(), output.stem)}


def open_run(run_dir: str | Path) -> ExportSource:
    run = RunDir(Path(run_dir))
    info = run.run_info()  # raises RunDirError naming final/dreambooth.json when missing
    config = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
    return ExportSource(run, info, config or {})


def export(run_dir: str | Path, fmt: str, output: str | Path, *, dtype: str = DEFAULT_DTYPE) -> Path:
    """Write RUN_DIR's model as `fmt` to `output`; returns the written path. Write failures (disk
    full, read-only folder, Ctrl-C, SIGTERM) raise ExportError and leave nothing behind."""
    source = open_run(run_dir)
    output, fmt = Path(output), ALIASES.get(fmt, fmt)
    raise_if_errors(f"cannot export {run_dir} as {fmt}", _check_request(source, fmt, output, dtype), ConfigError)
    with named_write_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        prune_stale_temporaries(output.parent)
        return EXPORTERS[fmt](source, output, DTYPES[dtype])


def export_after_training(run_dir: str | Path, formats: list[str], dtype: str = DEFAULT_DTYPE) -> list[Path]:
    """`train --export a,b`: write each format into RUN_DIR/export/ under a descriptive name.
    Every request is checked before the first is written, so a bad one fails fast."""
    source = open_run(run_dir)
    formats = [ALIASES.get(fmt, fmt) for fmt in formats]
    outputs = {fmt: default_output(source, fmt) for fmt in formats}
    problems = [p for fmt in formats for p in _check_request(source, fmt, outputs.get(fmt), dtype)]
    raise_if_errors(f"cannot export {run_dir}", problems, ConfigError)
    return [export(run_dir, fmt, out, dtype=dtype) for fmt, out in outputs.items()]


def default_output(source: ExportSource, fmt: str) -> Path:
    stem = f"{source.info['identifier']}-{source.info['class_noun']}".replace("/", "-").replace(" ", "-")
    name = {"diffusers": f"{stem}-diffusers", "single-file": f"{stem}.safetensors",
            "lora-peft": f"{stem}-lora-peft.safetensors", "lora-kohya": f"{stem}-lora-kohya.safetensors"}
    return source.run.root / "export" / name.get(fmt, stem)


def check_formats(formats: list[str], mode: str | None = None) -> None:
    """Before training: the requested formats exist and fit the training mode (LoRA formats need LoRA)."""
    problems = [Problem(f, f"unknown format; use one of {', '.join(FORMATS)} (or lora = lora-kohya)")
                for f in formats if ALIASES.get(f, f) not in FORMATS]
    if mode == "full":
        problems += [Problem(f, "needs train.mode=lora; a full fine-tune exports as diffusers or single-file")
                     for f in formats if ALIASES.get(f, f).startswith("lora-")]
    raise_if_errors("cannot export in the requested formats", problems, ConfigError)


def _check_request(source: ExportSource, fmt: str, output: Path | None, dtype: str) -> list[Problem]:
    problems = []
    if fmt not in FORMATS:
        problems.append(Problem(fmt, f"unknown format; use one of {', '.join(FORMATS)}"))
    if dtype not in DTYPES:
        problems.append(Problem(dtype, f"unknown dtype; use one of {', '.join(DTYPES)}"))
    if fmt.startswith("lora-") and not source.is_lora:
        problems.append(Problem(str(source.run.root), f"{fmt} needs a LoRA run (train.mode=lora); this run is a "
                                "full fine-tune: export it as diffusers or single-file"))
    targets = [output, v_config_path(output)] if output and fmt == "single-file" and _is_v(source) else [output]
    problems += [Problem(str(path), "already exists; exports never overwrite: choose another --output or "
                         "remove it first") for path in targets if path is not None and path.exists()]
    return problems


def merged_components(source: ExportSource):
    """The run's networks in fp32, with a LoRA run's adapters merged into its base weights."""
    if not source.is_lora:
        return load_components(str(source.run.final))
    components = load_components(str(source.info["base_model"]), prediction_type=source.info["prediction_type"])
    state, _ = read_lora_file(source.lora_file)
    alphas = source.alphas()
    for part in LORA_PARTS[:3 if components.is_xl else 2]:
        merge_lora(getattr(components, part), state, part, alphas[part] or _rank(state, part))
    return components


def _rank(state: dict[str, torch.Tensor], part: str) -> float:
    """Fallback alpha (= rank, scale 1) when a run's config does not record lora_alpha."""
    downs = [v for k, v in to_peft_layout(state).items() if k.startswith(part + ".") and k.endswith(".lora_A.weight")]
    return float(downs[0].shape[0]) if downs else 1.0


def export_diffusers(source: ExportSource, output: Path, dtype: torch.dtype) -> Path:
    """A complete pipeline folder; its dreambooth.json carries the run facts and modelspec block.

    The main weights are fp32 so that a plain `from_pretrained(folder)` gets one dtype everywhere
    (mixed dtypes fail at the first matrix product); fp16/bf16 is written as a diffusers variant
    (`*.fp16.safetensors`, loaded with `variant="fp16"`, and preferred by ComfyUI's loader)."""
    components = merged_components(source).to("cpu", torch.float32)
    variant = VARIANTS.get(dtype)
    info = dict(source.info, mode="full", merged_lora=source.is_lora, dtype="float32", variant=variant,
                metadata=source.metadata(lora=False))

    def write(tmp: Path) -> None:
        save_pipeline_folder(components, tmp)
        if variant:  # last: converting to the variant's dtype changes the networks in place
            for part in ("unet", "vae"):
                getattr(components, part).to(dtype).save_pretrained(tmp / part, variant=variant,
                                                                   safe_serialization=True)
            write_text_encoder(components.text_encoder, tmp / "text_encoder", dtype=dtype, variant=variant)
            if components.is_xl:
                _write_text_encoder_2(components.text_encoder_2, tmp / "text_encoder_2", dtype, variant)
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))

    return write_folder_atomically(output, write)


def _write_text_encoder_2(text_encoder_2, folder: Path, dtype: torch.dtype, variant: str) -> None:
    """The second encoder's variant beside its main weights (its `save_pretrained` would delete those).
    CLIPTextModelWithProjection keeps its `text_model.` level, so its state dict is the layout to save."""
    state = {k: v.to(dtype).contiguous() for k, v in text_encoder_2.state_dict().items()
             if not k.endswith("position_ids")}
    safetensors.torch.save_file(state, str(folder / f"model.{variant}.safetensors"), metadata={"format": "pt"})


def _is_v(source: ExportSource) -> bool:
    return source.info.get("prediction_type") == "v_prediction"


def v_config_path(output: Path) -> Path:
    """Where A1111 and Forge look for a checkpoint's own config: the same name with `.yaml`."""
    return output.with_suffix(".yaml")


def export_single_file(source: ExportSource, output: Path, dtype: torch.dtype) -> Path:
    """One .safetensors in the original layout, with the component configs in its metadata so this
    tool (and anyone reading the metadata) can reload it without guessing the architecture. A
    v-prediction model also gets its LDM config beside it, the one signal of `v` A1111 reads."""
    c = merged_components(source)
    configs = component_configs(c)
    state = pipeline_to_original(c.unet.state_dict(), c.vae.state_dict(), c.text_encoder.state_dict(), configs,
                                 c.text_encoder_2.state_dict() if c.is_xl else None)
    metadata = source.metadata(lora=False, implementation=STABILITY_IMPL)
    metadata[CONFIGS_METADATA_KEY] = json.dumps(configs, default=str)
    if not _is_v(source):
        return save_safetensors(output, {k: v.to(dtype) for k, v in state.items()}, metadata)
    text = yaml.safe_dump(ldm_inference_config(configs, source.info), sort_keys=False)
    save_safetensors(output, {k: v.to(dtype) for k, v in state.items()}, metadata)
    try:
        write_file_atomically(v_config_path(output), lambda tmp: tmp.write_text(text))
    except BaseException:
        output.unlink(missing_ok=True)  # a v model without its config would load as epsilon
        raise
    return output


def component_configs(components) -> dict:
    """Configs that rebuild the architecture: networks, the run's scheduler, the tokenizer settings
    (SDXL: also the second text encoder and tokenizer)."""
    import diffusers

    scheduler = diffusers.DDPMScheduler.load_config(components.folder, subfolder="scheduler")
    scheduler["prediction_type"] = components.prediction_type
    configs = {"unet": dict(components.unet.config), "vae": dict(components.vae.config),
               "text_encoder": components.text_encoder.config.to_dict(), "scheduler": dict(scheduler)}
    if components.is_xl:
        configs["text_encoder_2"] = components.text_encoder_2.config.to_dict()
    for tokenizer in ("tokenizer", "tokenizer_2") if components.is_xl else ("tokenizer",):
        settings = json.loads((components.folder / tokenizer / "tokenizer_config.json").read_text())
        configs[tokenizer] = {k: v for k, v in settings.items() if k not in ("is_local", "local_files_only")}
    return configs


def export_lora_peft(source: ExportSource, output: Path, dtype: torch.dtype) -> Path:
    state = to_peft_layout(read_lora_file(source.lora_file)[0])
    metadata = dict(source.lora_metadata(output, "diffusers"), format="pt", **adapter_metadata(state, source.alphas()))
    return save_safetensors(output, {k: v.to(dtype) for k, v in state.items()}, metadata)


def export_lora_kohya(source: ExportSource, output: Path, dtype: torch.dtype) -> Path:
    xl_unet = _xl_unet_config(source) if source.family() == "sdxl" else None
    state = peft_to_kohya(read_lora_file(source.lora_file)[0], source.alphas(), xl_unet)
    rank = next(v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight"))
    metadata = dict(source.lora_metadata(output, STABILITY_IMPL), ss_network_module="networks.lora",
                    ss_network_dim=str(rank), ss_network_alpha=str(source.alphas()["unet"]))
    return save_safetensors(output, {k: v.to(dtype) for k, v in state.items()}, metadata)


def _xl_unet_config(source: ExportSource) -> dict:
    return json.loads((source.model_folder() / "unet" / "config.json").read_text())


def save_safetensors(output: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    # called through the module, as diffusers' save_pretrained does: one name for every weights write
    return write_file_atomically(output, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata))


EXPORTERS: dict[str, Callable[[ExportSource, Path, torch.dtype], Path]] = {
    "diffusers": export_diffusers,
    "single-file": export_single_file,
    "lora-kohya": export_lora_kohya,
    "lora-peft": export_lora_peft,
}
