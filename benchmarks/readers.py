"""Run other tools' real loading code on our exports and print which keys each maps.

    python benchmarks/readers.py --folder EXPORT_DIR --single-file MODEL.safetensors \\
        --lora LORA-kohya.safetensors [--lora-peft LORA-peft.safetensors] \\
        [--comfyui CHECKOUT] [--sd-scripts CHECKOUT] [--a1111 CHECKOUT] [--old-python VENV/bin/python]

SD 1.x/2.x and SDXL exports alike (an SDXL single file goes through kohya's SDXL loader).
Each reader runs only when its checkout (or, for transformers 4, a Python whose environment has
it) is given and importable; otherwise its line says SKIPPED and why. Nothing of the readers is
copied into this project: point the script at checkouts made elsewhere. tests/test_readers.py
holds the same rules as offline tests.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _on_path(checkout: str | None, name: str, probe: str):
    """Put `checkout` on sys.path and import `probe`; returns the module or a reason to skip."""
    if not checkout:
        return f"SKIPPED: no --{name} checkout given"
    if not Path(checkout).is_dir():
        return f"SKIPPED: {checkout} is not a folder"
    sys.path.insert(0, str(Path(checkout).resolve()))
    try:
        return __import__(probe, fromlist=["_"])
    except Exception as e:  # a reader's import needs its own environment; say which part failed
        return f"SKIPPED: importing {probe} from {checkout} failed: {type(e).__name__}: {e}"


class _Absent(types.ModuleType):
    """Stands in for a package a reader imports at module level but never calls on our path."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        setattr(self, name, _Absent(f"{self.__name__}.{name}"))
        return getattr(self, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} was called, but it is a stand-in: install the real package")


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name, path, target=None):
        if name == self.package or name.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Absent(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _stand_in(packages: tuple[str, ...], users: str) -> list[str]:
    """The readers import torchvision and OpenCV at module level for parts our files never reach
    (training transforms, other model families): where one is not installed, import a stand-in."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    import diffusers.utils  # noqa: F401  (decides at import what is available)
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached as False before a stand-in can answer
    import_utils.is_cv2_available()
    sys.meta_path[:0] = [_AbsentFinder(name) for name in missing]
    return [f"{', '.join(missing)} not installed: a stand-in that raises when called is imported instead ({users})"]


def _prepare_comfyui() -> list[str]:
    """ComfyUI imports torchvision for Stable Cascade and Cosmos and picks CUDA at import time."""
    notes = _stand_in(("torchvision",), "ComfyUI uses it only in its Stable Cascade, Cosmos and ACE modules")
    import torch

    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        notes.append("no CUDA: ComfyUI runs with --cpu")
    return notes


def comfyui(args) -> list[str]:
    if not args.comfyui:
        return ["SKIPPED: no --comfyui checkout given"]
    sys.path.insert(0, str(Path(args.comfyui).resolve()))
    lines = _prepare_comfyui()
    sd = _on_path(args.comfyui, "comfyui", "comfy.sd")
    if isinstance(sd, str):
        return lines + [sd]
    if args.folder:
        te = _state(Path(args.folder) / "text_encoder" / "model.safetensors")
        lines.append(f"DiffusersLoader text encoder detected as {sd.detect_te_model(te)} (None = falls back to SD 1)")
    if args.single_file:
        with _captured_warnings(logging.DEBUG) as messages:  # ComfyUI logs missing and left-over keys
            model, clip, vae, _ = sd.load_checkpoint_guess_config(args.single_file, output_vae=True,
                                                                  output_clip=True)[:4]
        reports = [m for m in messages if any(w in m for w in ("missing", "unexpected", "left over"))]
        lines.append(f"checkpoint: {type(model.model).__name__}, model type {model.model.model_type.name}, "
                     f"text encoder {type(clip.cond_stage_model).__name__}, VAE {type(vae.first_stage_model).__name__}")
        lines.append(f"key reports while loading: {len(reports)}" + "".join(f"\n      {m[:300]}" for m in reports))
        if args.lora or args.lora_peft:
            import comfy.lora

            key_map = comfy.lora.model_lora_keys_unet(model.model, {})
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
            for path in filter(None, (args.lora, args.lora_peft)):
                lora = _state(Path(path))
                with _captured_warnings() as warnings:  # ComfyUI logs each unmapped key
                    loaded = comfy.lora.load_lora(lora, key_map)
                missed = [w for w in warnings if "lora key not loaded" in w]
                lines.append(f"{Path(path).name}: {len(loaded)} layers mapped, {len(missed)} of {len(lora)} "
                             f"tensors not loaded{': ' + missed[0] + ' ...' if missed else ''}")
    return lines


@contextlib.contextmanager
def _captured_warnings(level: int = logging.WARNING):
    messages: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())
    root = logging.getLogger()
    before, handlers = root.level, root.handlers[:]
    root.handlers[:] = [handler]  # the messages are reported below, not printed as they come
    root.setLevel(min(before, level))
    try:
        yield messages
    finally:
        root.handlers[:] = handlers
        root.setLevel(before)


def sd_scripts(args) -> list[str]:
    notes = _stand_in(("torchvision", "cv2"), "sd-scripts uses them for training images") if args.sd_scripts else []
    model_util = _on_path(args.sd_scripts, "sd-scripts", "library.model_util")
    if isinstance(model_util, str):
        return notes + [model_util]
    if not args.single_file:
        return ["SKIPPED: no --single-file given"]
    keys = _state(Path(args.single_file))
    if any(k.startswith("conditioner.embedders.") for k in keys):  # SDXL: kohya's own SDXL loader
        from library import sdxl_model_util

        text1, text2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
            sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, args.single_file, "cpu")
        lines = notes + [f"load_models_from_sdxl_checkpoint: {type(unet).__name__}, {type(text1).__name__}, "
                 f"{type(text2).__name__}, logit_scale {'absent' if logit_scale is None else 'present'} "
                 "(it raises on any missing or unexpected key; its reports are logged above)"]
        text_encoders = [text1, text2]
    else:
        v2 = any(k.startswith("cond_stage_model.model.") for k in keys)
        text, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, args.single_file)
        lines = notes + [f"load_models_from_stable_diffusion_checkpoint(v2={v2}): {type(unet).__name__}, "
                 f"{type(text).__name__} (its load_state_dict reports are logged above)"]
        text_encoders = [text]
    if args.lora:
        from networks import lora as kohya_lora

        network, weights = kohya_lora.create_network_from_weights(1.0, args.lora, vae, text_encoders, unet,
                                                                  for_inference=True)
        network.apply_to(text_encoders, unet)  # registers the modules, as kohya's own scripts do first
        result = network.load_state_dict(weights, strict=False)
        lines.append(f"networks.lora.create_network_from_weights({Path(args.lora).name}): "
                     f"{len(network.text_encoder_loras)} text-encoder and {len(network.unet_loras)} UNet modules; "
                     f"{len(result.unexpected_keys)} of {len(weights)} tensors unexpected, "
                     f"{len(result.missing_keys)} missing"
                     + (f": {(result.unexpected_keys or result.missing_keys)[:3]} ..."
                        if result.unexpected_keys or result.missing_keys else ""))
    return lines


def a1111(args) -> list[str]:
    config = _on_path(args.a1111, "a1111", "modules.sd_models_config")
    if isinstance(config, str):
        return [config + " (A1111's modules import its whole web UI; run this inside its venv)"]
    lines = []
    if args.single_file:
        info = type("Info", (), {"filename": args.single_file})()
        lines.append(f"config near the checkpoint: {config.find_checkpoint_config_near_filename(info)}")
    for path in filter(None, (args.lora, args.lora_peft)):
        from modules import sd_models

        meta = sd_models.read_metadata_from_safetensors(path)
        lines.append(f"{Path(path).name}: ss_v2={meta.get('ss_v2')} ss_base_model_version="
                     f"{meta.get('ss_base_model_version')} tags={meta.get('ss_tag_frequency')}")
    return lines


def transformers4(args) -> list[str]:
    if not args.old_python:
        return ["SKIPPED: no --old-python (a Python with transformers 4.x) given"]
    if not args.folder:
        return ["SKIPPED: no --folder given"]
    code = ("import sys, transformers; from transformers import CLIPTextModel; "
            "m, i = CLIPTextModel.from_pretrained(sys.argv[1], output_loading_info=True); "
            "print(transformers.__version__, {k: sorted(v) for k, v in i.items()})")
    done = subprocess.run([args.old_python, "-c", code, str(Path(args.folder) / "text_encoder")],
                          capture_output=True, text=True)
    return [done.stdout.strip() or f"FAILED: {done.stderr.strip()[-500:]}"]


def diffusers_now(args) -> list[str]:
    lines = []
    if args.folder:
        from diffusers import DiffusionPipeline
        from transformers import CLIPTextModel

        _, info = CLIPTextModel.from_pretrained(Path(args.folder) / "text_encoder", output_loading_info=True)
        lines.append(f"transformers (installed) text encoder: {json.dumps({k: sorted(v) for k, v in info.items()})}")
        pipe = DiffusionPipeline.from_pretrained(args.folder)  # SD or SDXL, from model_index.json
        lines.append(f"from_pretrained: dtypes {sorted({str(p.dtype) for p in pipe.unet.parameters()})}")
    return lines


def _versions() -> str:
    """The libraries a reader ran on: sd-scripts pins transformers 4 and diffusers 0.32."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "diffusers"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--folder", "--single-file", "--lora", "--lora-peft", "--comfyui", "--sd-scripts", "--a1111",
                 "--old-python"):
        p.add_argument(flag, default=None)
    args = p.parse_args()
    for name, reader in (("diffusers/transformers (this venv)", diffusers_now), ("transformers 4", transformers4),
                         ("ComfyUI", comfyui), ("kohya sd-scripts", sd_scripts), ("A1111", a1111)):
        try:
            lines = reader(args)
        except Exception as e:  # one reader failing must not hide the others' results
            lines = [f"FAILED: {type(e).__name__}: {e}"]
        print(f"== {name} ({_versions()})")
        print("\n".join(f"   {line}" for line in lines) or "   (nothing to check)")


if __name__ == "__main__":
    main()
