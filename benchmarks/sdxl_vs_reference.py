"""Our SDXL DreamBooth against diffusers' train_dreambooth_lora_sdxl.py, same recipe, same GPU, one invocation.

    python benchmarks/sdxl_vs_reference.py --reference DIR_WITH_train_dreambooth_lora_sdxl.py --out OUT
        [--budget 540] [--parts ref_lora,ours_lora,...] [--tiny] [--previous OLD_results.jsonl]

The model is the built-in `random-sdxl` (the published SDXL architecture with random weights, built
once from the shipped configs into the cache under --work and reused by every part); `--tiny` uses
`tiny-random-xl` at 64 px for a CPU dry run. Recipe: 1024 px, 1 subject + 1 class image per step
(prior preservation, lambda 1), bf16, constant LR; LoRA rank 4 at 1e-4. Each part runs in its own
process with its own time budget (one that does not fit in what is left is skipped); each finished
part is appended to OUT/results.jsonl and OUT/table.md is rewritten, so a run cut short still
leaves numbers. The reference has no full SDXL DreamBooth script: the full UNet parts are compared
with its LoRA script's steps and with the FLOP count of one full-UNet training step (`flops`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from gpu_vs_reference import parse_args, run_part_process, run_parts  # noqa: E402

SCRIPT = "train_dreambooth_lora_sdxl.py"
DEFAULT_ORDER = ["ref_lora", "ours_lora", "ours_full", "ours_full_24gb", "ref_classgen", "ours_classgen", "flops"]


def part_specs(tiny: bool) -> dict[str, dict]:
    """name -> what to run and its time budget in seconds."""
    n = (lambda big, small: small if tiny else big)
    return {
        "ref_lora": {"kind": "ref", "stop": n(40, 6), "budget": 170},
        "ours_lora": {"kind": "train", "preset": "sdxl-lora", "dotted": [], "measure": n(60, 6), "budget": 110},
        "ours_full": {"kind": "train", "preset": "sdxl-fast", "dotted": [], "measure": n(40, 6), "budget": 110},
        "ours_full_24gb": {"kind": "train", "preset": "sdxl-full-24gb", "dotted": [], "measure": n(30, 6),
                           "budget": 110, "cap_gb": 23.0},
        "ref_classgen": {"kind": "ref_classes", "batch": n(4, 2), "batches": n(3, 2), "budget": 90},
        "ours_classgen": {"kind": "classes", "batch": n(4, 2), "num": n(12, 4), "budget": 90},
        "flops": {"kind": "flops", "budget": 60},
    }


def model_name(tiny: bool) -> str:
    return "tiny-random-xl" if tiny else "random-sdxl"


def resolution(tiny: bool) -> int:
    return 64 if tiny else 1024


def run_worker(name: str, spec: dict, work: Path, tiny: bool, reference: Path, log) -> dict:
    """The reference training part runs here under reference_probe.py (it reads the script's bars);
    every other part in a fresh Python process of this file (clean memory peaks)."""
    if spec["kind"] == "ref":
        from reference_runner import reference_args, run_reference

        args = reference_args("lora", model_folder(tiny), work / "instance", work / "class_ref", work / f"out_{name}",
                              num_class=2, max_steps=spec["stop"] + 1000, resolution=resolution(tiny))
        return run_reference(reference / SCRIPT, args, stop_after=spec["stop"], budget_s=spec["budget"],
                             mixed_precision="no" if tiny else "bf16", log=log)
    return run_part_process(Path(__file__), name, spec, work, tiny, log, dict(os.environ))


def model_folder(tiny: bool) -> Path:
    from dreambooth.models.builtin import builtin_path

    return builtin_path(model_name(tiny))  # built once under DREAMBOOTH_CACHE, then reused


def worker_main(name: str, spec: dict, work: Path, tiny: bool) -> None:
    import ours_parts as ours

    model = model_folder(tiny)
    # few class images (the recipe is 1 subject + 1 class image per step; how many exist does not
    # change a step's cost), made once per preset's sampler settings and cached under --work
    dotted = ["prior.num_images=2", "prior.batch_size=2"] + (["data.resolution=64", "prior.steps=3"] if tiny else [])
    if spec["kind"] == "train":
        result = ours.train_part(model, work / "instance", work / f"run_{name}", preset=spec["preset"],
                                 dotted=dotted + spec["dotted"], measure=spec["measure"], cap_gb=spec.get("cap_gb"))
    elif spec["kind"] == "classes":
        result = classes_part(model, work / f"classes_{name}", spec["batch"], spec["num"], tiny)
    elif spec["kind"] == "ref_classes":
        from ours_parts import reference_classes_part

        result = reference_classes_part(model, spec["batch"], spec["batches"], pipeline="StableDiffusionXLPipeline",
                                        dtype=_device()[1], size=resolution(tiny), steps=3 if tiny else 50,
                                        prompt="a photo of a dog")
    else:
        result = flops_part(model, tiny)
    print("RESULT " + json.dumps(result), flush=True)


def _device():
    import torch

    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32


def classes_part(model: Path, out: Path, batch: int, num: int, tiny: bool) -> dict:
    """Class images/s through the training run's own path (sdxl-lora's prior settings: DPM++ 25 steps)."""
    from ours_parts import gpu_memory, run_config

    from dreambooth.models import load_components
    from dreambooth.priors import class_image_key, ensure_class_images
    from dreambooth.sampling import make_pipeline
    from dreambooth.training.fast import prepare_modules

    dotted = [f"prior.batch_size={batch}", f"prior.cache={out}"] + (["data.resolution=64", "prior.steps=3"] if tiny
                                                                    else [])
    config = run_config(model, out, "sdxl-lora", dotted)
    device, dtype = _device()
    components = load_components(str(model))
    components.vae.to(device)  # fp32: SDXL's VAE overflows in half precision
    for encoder in (components.text_encoder, components.text_encoder_2):
        encoder.to(device, dtype)
    components.unet.to(device)
    prepare_modules(components, config, device)
    stamps = []
    began = time.perf_counter()
    ensure_class_images(class_image_key(components.folder, config), num,
                        lambda: make_pipeline(components, config.prior.sampler, device=device),
                        cache_dir=out, batch_size=batch, progress=lambda done, total: stamps.append(
                            (time.perf_counter(), done)))
    steady = stamps[2:]  # stamps[0]: before any work; the first batch warms up
    rate = ((steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1
            else num / (time.perf_counter() - began))
    return {"images_per_s": rate, "images": num, "batch": batch, "unet_evals_per_image": 2 * config.prior.steps,
            **gpu_memory()}


def flops_part(model: Path, tiny: bool) -> dict:
    """FLOPs of one full-UNet training step (forward + backward) on a subject + class pair, counted
    by torch's FlopCounterMode (matrix products and convolutions; elementwise work is not counted)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = _device()
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet").to(device)
    latent = resolution(tiny) // 8
    batch, cfg = 2, unet.config
    sample = torch.randn(batch, cfg.in_channels, latent, latent, device=device)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, device=device)
    pooled = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                         device=device)
    time_ids = torch.tensor([[resolution(tiny)] * 2 + [0, 0] + [resolution(tiny)] * 2] * batch, device=device,
                            dtype=torch.float32)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=dtype,
                                                                  enabled=dtype != torch.float32):
        out = unet(sample, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        out.float().pow(2).mean().backward()
    parameters = sum(p.numel() for p in unet.parameters())
    return {"flops_per_step": counter.get_total_flops(), "batch": batch, "latent": latent,
            "unet_parameters": parameters}


def make_table(results: list[dict]) -> str:
    """One row per part: steps/s or images/s, ratio to the reference, peaks; the FLOP count below."""
    latest = {r["part"]: r for r in results if not r.get("skipped") and "part" in r}
    get = lambda part, key: latest.get(part, {}).get(key)  # noqa: E731
    fmt = lambda x, unit="": "n/a" if x is None else f"{x:.2f}{unit}"  # noqa: E731
    rows = ["| part | rate | vs ref_lora / ref_classgen | peak allocated | peak reserved |",
            "| --- | --- | --- | --- | --- |"]
    for part in DEFAULT_ORDER[:-1]:
        key = "images_per_s" if part.endswith("classgen") else "steps_per_s"
        ref = get("ref_classgen" if part.endswith("classgen") else "ref_lora", key)
        rate = get(part, key)
        ratio = rate / ref if rate and ref else None
        rows.append(f"| {part} | {fmt(rate, ' img/s' if part.endswith('classgen') else ' steps/s')} | "
                    f"{fmt(ratio, 'x')} | {fmt(get(part, 'peak_allocated_gb'), ' GB')} | "
                    f"{fmt(get(part, 'peak_reserved_gb'), ' GB')} |")
    flops = get("flops", "flops_per_step")
    if flops:
        rows.append(f"\nFull UNet training step (forward + backward, batch 2): {flops / 1e12:.4g} TFLOP; at "
                    f"ours_full's rate {fmt((get('ours_full', 'steps_per_s') or 0) * flops / 1e12)} TFLOP/s")
    return "\n".join(rows) + "\n"


def setup(work: Path, tiny: bool) -> None:
    from sd15_random import write_subject_photos

    work.mkdir(parents=True, exist_ok=True)
    model_folder(tiny)
    write_subject_photos(work / "instance", size=resolution(tiny))


def main() -> None:
    args = parse_args(__doc__, "folder with train_dreambooth_lora_sdxl.py", "bench-out-sdxl",
                      "/tmp/dreambooth-bench-sdxl", 540, DEFAULT_ORDER,
                      "tiny-random-xl at 64 px: a CPU dry run of every part")
    if args.worker:
        worker_main(args.worker, json.loads(args.spec), args.work, args.tiny)
        return
    run_parts(args, setup, part_specs(args.tiny), run_worker, make_table)


if __name__ == "__main__":
    main()
