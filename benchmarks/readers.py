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
import json
import logging
import subprocess
import sys
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


def comfyui(args) -> list[str]:
    sd = _on_path(args.comfyui, "comfyui", "comfy.sd")
    if isinstance(sd, str):
        return [sd]
    lines = []
    if args.folder:
        te = _state(Path(args.folder) / "text_encoder" / "model.safetensors")
        lines.append(f"DiffusersLoader text encoder detected as {sd.detect_te_model(te)} (None = falls back to SD 1)")
    if args.single_file:
        model, clip, vae, _ = sd.load_checkpoint_guess_config(args.single_file, output_vae=True, output_clip=True)[:4]
        lines.append(f"checkpoint: {type(model.model).__name__}, model type {model.model.model_type.name}")
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
def _captured_warnings():
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger().removeHandler(handler)


def sd_scripts(args) -> list[str]:
    model_util = _on_path(args.sd_scripts, "sd-scripts", "library.model_util")
    if isinstance(model_util, str):
        return [model_util]
    if not args.single_file:
        return ["SKIPPED: no --single-file given"]
    keys = _state(Path(args.single_file))
    if any(k.startswith("conditioner.embedders.") for k in keys):  # SDXL: kohya's own SDXL loader
        from library import sdxl_model_util

        text1, text2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
            sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, args.single_file, "cpu")
        return [f"load_models_from_sdxl_checkpoint: {type(unet).__name__}, {type(text1).__name__}, "
                f"{type(text2).__name__}, logit_scale {'absent' if logit_scale is None else 'present'} "
                "(it raises on any missing or unexpected key; its reports are logged above)"]
    v2 = any(k.startswith("cond_stage_model.model.") for k in keys)
    text, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, args.single_file)
    return [f"load_models_from_stable_diffusion_checkpoint(v2={v2}): {type(unet).__name__}, {type(text).__name__} "
            "(its load_state_dict reports are logged above)"]


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
        print(f"== {name}")
        print("\n".join(f"   {line}" for line in lines) or "   (nothing to check)")


if __name__ == "__main__":
    main()
