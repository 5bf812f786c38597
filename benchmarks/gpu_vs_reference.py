"""Our DreamBooth against diffusers' example scripts, same recipe, same GPU, one invocation.

    python benchmarks/gpu_vs_reference.py --reference DIR_WITH_train_dreambooth.py --out OUT [--budget 460]
        [--parts ref_full,ours_full,...] [--tiny] [--previous OLD_results.jsonl]

Builds a random-weight Stable Diffusion 1.5 (sd15_random.py), then runs the parts in priority order,
each in its own process with its own time budget (a part that does not fit in what is left is
skipped). Every finished part is appended to OUT/results.jsonl and the table OUT/table.md is
rewritten, so a run cut short still leaves numbers. `--tiny` shrinks the model for a CPU dry run.
The reference scripts are not part of this repository: pass the folder that holds
train_dreambooth.py and train_dreambooth_lora.py (diffusers/examples/dreambooth).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from ours_parts import run_worker_process  # noqa: E402
from report import make_table  # noqa: E402

FAST, LEAN, LORA_LEAN = "sd15-fast", "sd15-lean", "sd15-lora-lean"
LORA = ["train.mode=lora", "train.lr=1e-4", "train.lora_rank=4", "train.lora_alpha=4.0"]


def part_specs(tiny: bool) -> dict[str, dict]:
    """name -> what to run and its time budget in seconds (priority order is `DEFAULT_ORDER`)."""
    n = (lambda big, small: small if tiny else big)
    return {
        "ref_full": {"kind": "ref", "script": "train_dreambooth.py", "variant": "full", "stop": n(45, 6),
                     "budget": 100},
        "ours_full": {"kind": "train", "preset": FAST, "dotted": [], "measure": n(120, 6), "budget": 90, "profile": 3},
        "ref_lora": {"kind": "ref", "script": "train_dreambooth_lora.py", "variant": "lora", "stop": n(45, 6),
                     "budget": 80},
        "ours_lora": {"kind": "train", "preset": FAST, "dotted": LORA, "measure": n(150, 6), "budget": 60},
        "ours_cls_pndm50": {"kind": "classes", "sampler": "pndm", "steps": n(50, 3), "batch": n(16, 2),
                            "num": n(48, 4), "budget": 70},
        "ours_cls_dpmpp25": {"kind": "classes", "sampler": "dpmpp", "steps": n(25, 3), "batch": n(25, 2),
                             "num": n(75, 4), "budget": 90},
        "lean_full": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false"],
                      "measure": n(80, 6), "budget": 130, "cap_gb": None, "profile": 3},
        "lean_lora": {"kind": "train", "preset": LEAN, "dotted": LORA + ["train.train_text_encoder=false",
                                                                        "train.optimizer=adamw"],
                      "measure": n(100, 6), "budget": 60},
        "lean_full_te16": {"kind": "train", "preset": LEAN, "dotted": [], "measure": n(40, 6), "budget": 80,
                           "cap_gb": 15.0},
        "plain_full": {"kind": "train", "preset": FAST, "dotted": ["train.fast=never"], "measure": n(40, 6),
                       "budget": 90, "profile": 3},
        "ours_full_nocl": {"kind": "train", "preset": FAST, "dotted": ["train.channels_last=false"],
                           "measure": n(120, 6), "budget": 80, "profile": 3},
        "lean_full_nocl": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                     "train.channels_last=false"],
                           "measure": n(40, 6), "budget": 60},
        "lean_full_adamw": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                      "train.optimizer=adamw"],
                            "measure": n(40, 6), "budget": 60},
        "ours_e2e": {"kind": "e2e", "preset": FAST, "dotted": [] if not tiny else [
            "prior.num_images=8", "train.steps=8", "data.resolution=64", "prior.steps=3"], "budget": 200, "min": 120},
        "ours_full_compile": {"kind": "train", "preset": FAST, "dotted": ["train.compile=default"],
                              "measure": n(150, 6), "budget": 300, "min": 200, "profile": 3,
                              "env": {"TORCH_LOGS": "recompiles,graph_breaks"}},
        "ours_lora_compile": {"kind": "train", "preset": FAST, "dotted": LORA + ["train.compile=default"],
                              "measure": n(200, 6), "budget": 290, "min": 200, "profile": 3,
                              "env": {"TORCH_LOGS": "recompiles,graph_breaks"}},
        "lean_lora_compile": {"kind": "train", "preset": LEAN, "dotted": LORA + [
            "train.train_text_encoder=false", "train.optimizer=adamw", "train.compile=default"],
            "measure": n(100, 6), "budget": 330, "min": 200},
        "lean_full_expandable": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false"],
                                 "measure": n(60, 6), "budget": 80,
                                 "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
        "lean_full_nograph": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                        "train.cuda_graph=false"],
                              "measure": n(60, 6), "budget": 80},
        "lean_full_wscap": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false"],
                            "measure": n(60, 6), "budget": 80, "env": {"CUDNN_CONV_WSCAP_DBG": "256"}},
        "lean_full_nockpt": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                       "train.gradient_checkpointing=false"],
                             "measure": n(100, 6), "budget": 100},
        "ours_cls_pndm50_compile": {"kind": "classes", "sampler": "pndm", "steps": n(50, 3), "batch": n(16, 2),
                                    "num": n(64, 4), "budget": 150, "compile": True},
        "ref_e2e": {"kind": "ref", "script": "train_dreambooth.py", "variant": "e2e", "stop": None,
                    "steps": n(800, 8), "num_class": n(200, 4), "budget": 560, "min": 400},
        "lean_full_cl": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                   "train.channels_last=true"],
                         "measure": n(60, 6), "budget": 90, "profile": 3},
        "lean_full_cl_expandable": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                              "train.channels_last=true"],
                                    "measure": n(60, 6), "budget": 80,
                                    "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
        "ours_lora_compile_again": {"kind": "train", "preset": FAST, "dotted": LORA + ["train.compile=default"],
                                    "measure": n(200, 6), "budget": 290, "min": 60, "profile": 0,
                                    "env": {"TORCH_LOGS": "recompiles,graph_breaks"}},
        "ours_full_compile_again": {"kind": "train", "preset": FAST, "dotted": ["train.compile=default"],
                                    "measure": n(150, 6), "budget": 300, "min": 60,
                                    "env": {"TORCH_LOGS": "recompiles,graph_breaks"}},
        "lean_full_fp8": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                    "train.optimizer=adamwfp8_torchao"],
                          "measure": n(80, 6), "budget": 130, "profile": 3},
        "lean_full_fp8_l3": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                       "train.optimizer=adamwfp8_torchao",
                                                                       "train.checkpoint_levels=3"],
                             "measure": n(80, 6), "budget": 130, "profile": 3},
        # prior.* as sd15-fast so the class images of earlier parts are reused (the preset's own
        # sampler settings would generate 200 new ones first)
        "lean_lora_preset": {"kind": "train", "preset": LORA_LEAN, "dotted": [
            "prior.steps=25", "prior.sampler=dpmpp", "prior.batch_size=25"], "measure": n(100, 6), "budget": 90},
        "ours_full_compile_fp8": {"kind": "train", "preset": FAST, "dotted": ["train.compile=default",
                                                                             "train.optimizer=adamwfp8"],
                                  "measure": n(150, 6), "budget": 300, "min": 200, "profile": 3},
        "lean_full_ours_fp8": {"kind": "train", "preset": LEAN, "dotted": ["train.train_text_encoder=false",
                                                                         "train.optimizer=adamwfp8"],
                               "measure": n(80, 6), "budget": 110, "profile": 3},
        "lean_full_te16_ours_fp8": {"kind": "train", "preset": LEAN, "dotted": ["train.optimizer=adamwfp8"],
                                    "measure": n(40, 6), "budget": 80, "cap_gb": 15.0},
        "lean_full_te16_fp8": {"kind": "train", "preset": LEAN, "dotted": ["train.optimizer=adamwfp8_torchao"],
                               "measure": n(40, 6), "budget": 90, "cap_gb": 15.0},
        "lean_lora_l1": {"kind": "train", "preset": LEAN, "dotted": LORA + [
            "train.train_text_encoder=false", "train.optimizer=adamw", "train.checkpoint_levels=1"],
            "measure": n(100, 6), "budget": 60},
        "lean_lora_l2": {"kind": "train", "preset": LEAN, "dotted": LORA + [
            "train.train_text_encoder=false", "train.optimizer=adamw", "train.checkpoint_levels=2"],
            "measure": n(100, 6), "budget": 60},
        "ours_cls_pndm50_compile_profile": {"kind": "classes", "sampler": "pndm", "steps": n(50, 3),
                                            "batch": n(16, 2), "num": n(32, 4), "budget": 200, "compile": True,
                                            "profile": True},
        "ours_cls_dpmpp25_fast": {"kind": "classes", "sampler": "dpmpp", "steps": n(25, 3), "batch": n(25, 2),
                                  "num": n(100, 4), "budget": 90, "fast": True},
        "ours_cls_dpmpp15_fast50": {"kind": "classes", "sampler": "dpmpp", "steps": n(15, 3), "batch": n(50, 2),
                                    "num": n(150, 4), "budget": 90, "fast": True},
        "ours_cls_dpmpp25_fast50": {"kind": "classes", "sampler": "dpmpp", "steps": n(25, 3), "batch": n(50, 2),
                                    "num": n(150, 4), "budget": 90, "fast": True},
        "ref_cls": {"kind": "ref_classes", "batch": n(4, 2), "batches": n(6, 2), "budget": 90},
        "ours_full_nocopy": {"kind": "train", "preset": FAST, "dotted": ["train.weight_copy=false"],
                             "measure": n(120, 6), "budget": 90, "profile": 3},
        "ours_full_cudnn_benchmark": {"kind": "train", "preset": FAST, "dotted": ["train.cudnn_benchmark=true"],
                                      "measure": n(120, 6), "budget": 90},
        # the same as ours_e2e later in an invocation: the driver's compiled-kernel cache is warm
        "ours_e2e_again": {"kind": "e2e", "preset": FAST, "dotted": [] if not tiny else [
            "prior.num_images=8", "train.steps=8", "data.resolution=64", "prior.steps=3"], "budget": 200, "min": 120},
        # ours_e2e with cProfile over the main thread up to the first step: where start-up goes
        "ours_e2e_profile_startup": {"kind": "e2e", "preset": FAST, "profile_startup": True, "dotted": [] if not tiny
                                     else ["prior.num_images=8", "train.steps=8", "data.resolution=64",
                                           "prior.steps=3"], "budget": 200, "min": 120},
        "ref_full_te": {"kind": "ref", "script": "train_dreambooth.py", "variant": "full_te", "stop": n(40, 6),
                        "budget": 90},
    }


DEFAULT_ORDER = ["ref_full", "ours_full", "ref_lora", "ours_lora", "ours_cls_pndm50", "ours_cls_dpmpp25",
                 "lean_full", "lean_lora", "lean_full_te16", "plain_full", "ours_e2e", "ours_full_compile",
                 "ref_full_te"]


def run_worker(name: str, spec: dict, work: Path, tiny: bool, reference: Path, log) -> dict:
    """One part; reference parts run here, ours in a fresh Python process (clean memory peaks)."""
    if spec["kind"] == "ref":
        from reference_runner import reference_args, run_reference

        # The first reference run fills class_ref and later ones reuse it; end to end starts with none.
        to_end = spec["stop"] is None
        classes = work / (f"class_{name}" if to_end else "class_ref")
        args = reference_args(spec["variant"], work / "model", work / "instance", classes, work / f"out_{name}",
                              num_class=spec.get("num_class", 4 if tiny else 12),
                              max_steps=spec["steps"] if to_end else spec["stop"] + 1000,
                              resolution=64 if tiny else 512)
        return run_reference(reference / spec["script"], args, stop_after=spec["stop"] or 10**9,
                             budget_s=spec["budget"], mixed_precision="no" if tiny else "bf16", log=log)
    env = dict(os.environ, **spec.get("env", {}))
    if spec["kind"] == "e2e":
        env["DREAMBOOTH_CACHE"] = str(work / f"cache_{name}")  # cold: no class images, no identity memo
    return run_part_process(Path(__file__), name, spec, work, tiny, log, env)


def run_part_process(script: Path, name: str, spec: dict, work: Path, tiny: bool, log, env: dict) -> dict:
    """`script --worker name` in a fresh Python process; its RESULT, or what failed."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", name, "--work", str(work),
           "--spec", json.dumps(spec)] + (["--tiny"] if tiny else [])
    began = time.perf_counter()
    result, returncode, text = run_worker_process(cmd, Path(log.name).parent / f"part_{name}.log", spec["budget"], env)
    log.write(text)
    if result is None:
        result = {"failed": True, "error_tail": text[-3000:]}
    elif returncode:
        result["killed_after_result"] = True
    result["process_s"] = time.perf_counter() - began
    return result


def worker_main(name: str, spec: dict, work: Path, tiny: bool) -> None:
    import ours_parts as ours
    import torch

    model, images = work / "model", work / "instance"
    dotted = list(spec.get("dotted", []))
    if tiny and spec["kind"] in ("train", "e2e"):
        dotted = ["data.resolution=64", "prior.num_images=4", "prior.steps=3", "prior.batch_size=2"] + dotted
    elif spec["kind"] == "train":
        dotted = ["prior.num_images=12"] + dotted
    if spec["kind"] == "train":
        result = ours.train_part(model, images, work / f"run_{name}", preset=spec["preset"], dotted=dotted,
                                 measure=spec["measure"], cap_gb=spec.get("cap_gb"), profile=spec.get("profile", 0))
    elif spec["kind"] == "classes":
        result = ours.classes_part(model, work / f"classes_{name}", sampler=spec["sampler"], steps=spec["steps"],
                                   batch=spec["batch"], num=spec["num"], compile_unet=spec.get("compile", False),
                                   profile=spec.get("profile", False), fast=spec.get("fast", False))
    elif spec["kind"] == "ref_classes":
        # train_dreambooth.py's class images: fp16 on CUDA, the model's own scheduler, 50 steps
        result = ours.reference_classes_part(
            model, spec["batch"], spec["batches"], pipeline="StableDiffusionPipeline", prompt="a photo of dog",
            dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
            size=64 if tiny else 512, steps=3 if tiny else 50)
    else:
        result = ours.e2e_part(model, images, work / f"run_{name}", preset=spec["preset"], dotted=dotted,
                               profile_startup=spec.get("profile_startup", False))
    print("RESULT " + json.dumps(result), flush=True)


def best_layout(results: list[dict]) -> list[str]:
    """The end-to-end run uses the faster measured memory layout (the preset then ships that one)."""
    rate = {r["part"]: r.get("steps_per_s") or 0 for r in results if r.get("part") in ("ours_full", "ours_full_nocl")}
    return ["train.channels_last=false"] if rate.get("ours_full_nocl", 0) > rate.get("ours_full", 0) else []


def environment() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for pkg in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # report what is missing rather than stop the benchmark
            info[pkg] = f"missing ({type(e).__name__})"
    return info


def setup(work: Path, tiny: bool) -> None:
    from sd15_random import build_pipeline_folder, write_subject_photos

    work.mkdir(parents=True, exist_ok=True)
    build_pipeline_folder(work / "model", tiny=tiny)
    write_subject_photos(work / "instance", size=64 if tiny else 512)


def parse_args(doc: str, reference: str, out: str, work: str, budget: float, order: list[str], tiny: str):
    """The command line both GPU benchmarks share; the environment their parts run in."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--reference", type=Path, help=reference)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--budget", type=float, default=budget, help="seconds for the whole invocation")
    parser.add_argument("--parts", default=",".join(order))
    parser.add_argument("--previous", type=Path, help="results.jsonl of an earlier run to merge into the table")
    parser.add_argument("--tiny", action="store_true", help=tiny)
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DREAMBOOTH_CACHE", str(args.work / "cache"))  # shared by every part
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return args


def main() -> None:
    args = parse_args(__doc__, "folder with train_dreambooth.py and train_dreambooth_lora.py", "bench-out",
                      "/tmp/dreambooth-bench", 460, DEFAULT_ORDER, "tiny model at 64 px: a CPU dry run of every part")
    if args.worker:
        worker_main(args.worker, json.loads(args.spec), args.work, args.tiny)
        return
    run_parts(args, setup, part_specs(args.tiny), run_worker, make_table, _with_best_layout)


def _with_best_layout(spec: dict, results: list[dict]) -> dict:
    if spec["kind"] == "e2e":
        spec["dotted"] = spec["dotted"] + best_layout(results)
    return spec


def run_parts(args, setup, specs: dict, run_worker, make_table, adjust=lambda spec, results: spec) -> None:
    """Setup, then each part of --parts in order within what is left of --budget; results.jsonl and
    table.md are written after each part. `adjust(spec, results)` may change a spec from earlier results."""
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path, log = args.out / "results.jsonl", open(args.out / "bench.log", "a", buffering=1)
    previous = [json.loads(x) for x in args.previous.read_text().splitlines()] if args.previous else []
    env = environment()
    t = time.perf_counter()
    setup(args.work, args.tiny)
    results = previous + [{"part": "setup", "seconds": time.perf_counter() - t, "env": env}]
    with open(results_path, "a") as f:
        f.write(json.dumps(results[-1]) + "\n")
    for name in args.parts.split(","):
        spec = dict(specs[name])
        left = args.budget - (time.perf_counter() - began)
        if left < spec.get("min", min(spec["budget"], 45)):
            results.append({"part": name, "skipped": f"{left:.0f} s left"})
            continue
        spec["budget"] = min(spec["budget"], left - 5)
        spec = adjust(spec, results)
        print(f"== {name} (budget {spec['budget']:.0f} s)", flush=True)
        t = time.perf_counter()
        try:
            result = run_worker(name, spec, args.work, args.tiny, args.reference, log)
        except subprocess.TimeoutExpired:
            result = {"failed": True, "error_tail": f"over its {spec['budget']:.0f} s budget"}
        results.append({"part": name, "wall_s": time.perf_counter() - t, **result})
        with open(results_path, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
        (args.out / "table.md").write_text(make_table(results))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("losses", "error_tail")})[:600], flush=True)
    (args.out / "table.md").write_text(make_table(results))
    print(make_table(results), flush=True)


if __name__ == "__main__":
    main()
