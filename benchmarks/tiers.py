"""The tier presets end to end under emulated cards, with diffusers' example scripts beside them.

    python benchmarks/tiers.py --reference DIR_WITH_train_dreambooth.py --out OUT [--budget 560]
        [--rows sd21-16gb,ref-sd21-16gb,...] [--steps 100] [--tiny]

Each row runs in its own process with the card emulated: `torch.cuda.set_per_process_memory_fraction`
caps the process at the card's usable memory (counted from the GPU's total), and a T4 row also forces
fp16 and turns TF32 off (a T4 has neither bf16 nor TF32). Our rows run the preset as a user would,
on the built-in random-weight SD 1.5 / SD 2.1 at the preset's resolution: class images, the steps,
the validation samples and the final save; the run's log.jsonl gives the peak memory of each phase.
Reference rows run train_dreambooth.py / train_dreambooth_lora.py (diffusers/examples/dreambooth, not
part of this repository) under the same cap and precision on the same model folder, and are stopped
once their steady-state speed is measured. A row that does not fit in what is left of the budget is
skipped; every finished row is appended to OUT/results.jsonl at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from ours_parts import limit_memory, run_worker_process  # noqa: E402

# card: (cap GB, precision forced or None for the preset's auto, TF32 allowed)
CARDS = {"t4-16gb": (15.0, "fp16", False), "rtx3060-12gb": (11.5, None, True), "rtx3070-8gb": (7.5, None, True),
         "rtx2070-8gb": (7.5, "fp16", False), "rtx3090-24gb": (23.0, None, True)}
# row: what runs, on which card. Priority order = the order of ROWS.
ROWS = {
    "sd21-16gb": {"preset": "sd21-16gb", "model": "random-sd21", "card": "t4-16gb", "budget": 170},
    "ref-sd21-16gb": {"ref": "full", "model": "random-sd21", "card": "t4-16gb", "extra": ["--gradient_checkpointing"],
                      "budget": 90},
    "sd15-12gb": {"preset": "sd15-12gb", "model": "random-sd15", "card": "rtx3060-12gb", "budget": 110},
    "ref-sd15-12gb": {"ref": "full_te", "model": "random-sd15", "card": "rtx3060-12gb", "budget": 70},
    "sd15-8gb": {"preset": "sd15-8gb", "model": "random-sd15", "card": "rtx3070-8gb", "budget": 80},
    "ref-sd15-8gb": {"ref": "lora", "model": "random-sd15", "card": "rtx3070-8gb", "budget": 70},
    "sd21-lora-8gb": {"preset": "sd21-lora-8gb", "model": "random-sd21", "card": "rtx2070-8gb", "budget": 110},
    "ref-sd21-lora-8gb": {"ref": "lora", "model": "random-sd21", "card": "rtx2070-8gb",
                          "extra": ["--gradient_checkpointing"], "budget": 80},
    "sd15-24gb": {"preset": "sd15-24gb", "model": "random-sd15", "card": "rtx3090-24gb", "budget": 90},
    "ref-sd15-24gb": {"ref": "full_te", "model": "random-sd15", "card": "rtx3090-24gb", "budget": 70},
    # SDXL at 1024 px: ours only (the reference's SDXL LoRA script is compared in sdxl_vs_reference.py)
    "sdxl-lora": {"preset": "sdxl-lora", "model": "random-sdxl", "card": "rtx3060-12gb", "budget": 170},
    "sdxl-lora-8gb": {"preset": "sdxl-lora-8gb", "model": "random-sdxl", "card": "rtx3070-8gb", "budget": 170},
    "sdxl-full-24gb": {"preset": "sdxl-full-24gb", "model": "random-sdxl", "card": "rtx3090-24gb", "budget": 200},
}
REF_STEPS = 30  # reference rows: steps to see; the rate leaves out the first 6


def emulate_card(cap_gb: float | None, tf32: bool = True) -> None:
    """Cap this process's CUDA memory at `cap_gb` (GB = 1e9 bytes) and set TF32 as the card has it."""
    import torch

    limit_memory(cap_gb)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def row_dotted(spec: dict, steps: int, tiny: bool) -> list[str]:
    """The preset as shipped, shortened: `steps` steps, a few class images (two batches: the phase
    peak is that of one batch), one validation grid at the end, no intermediate checkpoint."""
    from dreambooth.config_files import read_preset

    preset = read_preset(spec["preset"])
    batch = int(preset.get("prior", {}).get("batch_size", 4))
    dotted = [f"train.steps={steps}", f"prior.num_images={2 * batch}", "output.checkpoint_every=0",
              "output.sample_every=0", "output.log_every=1"]
    forced = CARDS[spec["card"]][1]
    if forced and not tiny:  # the CPU dry run keeps full precision
        dotted.append(f"train.mixed_precision={forced}")
    if tiny:
        dotted += ["data.resolution=64", "prior.steps=3", "model.prediction_type=epsilon"]
    return dotted


def native_size(model: str) -> int:
    """The subject photos' size for a full-size random model: its native resolution."""
    return {"random-sd15": 512, "random-sd21": 768, "random-sdxl": 1024}[model]


def ours_worker(name: str, spec: dict, work: Path, steps: int, tiny: bool) -> dict:
    """One tier preset end to end in this process; phase peaks from the run's log.jsonl."""
    import torch

    from dreambooth.config import load_config
    from dreambooth.errors import DreamboothError
    from dreambooth.training import events as ev
    from dreambooth.training import train_events

    cap, _, tf32 = CARDS[spec["card"]]
    emulate_card(None if tiny else cap, tf32)
    model = ("tiny-random-xl" if "sdxl" in spec["model"] else "tiny-random") if tiny else spec["model"]
    run = work / f"run_{name}"
    config = load_config(spec["preset"], {"model": {"name": model}, "data": {
        "images": str(work / ("instance64" if tiny else f"instance{native_size(model)}")),
        "class_noun": "dog"}, "prior": {"cache": str(work / f"classes_{name}")}}, row_dotted(spec, steps, tiny))
    stamps, began, result = [], time.perf_counter(), {"finished": False}
    try:
        for event in train_events(config, run, overwrite=True):
            if isinstance(event, ev.StepDone):
                stamps.append(time.perf_counter())
            elif isinstance(event, ev.Started):
                result["precision"] = event.mixed_precision
            elif isinstance(event, ev.Notice):
                result.setdefault("notices", []).append(event.message[:300])
            elif isinstance(event, ev.Finished):
                result["finished"] = True
    except DreamboothError as e:  # out of memory in a phase, among others: the row records it
        result["error"] = e.report()[:1500]
    except torch.OutOfMemoryError as e:
        result["error"] = f"raw out of memory: {str(e)[:600]}"
    skip = max(3, len(stamps) // 5)
    if len(stamps) > skip + 1:
        result["steps_per_s"] = (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
    result.update(steps=len(stamps), wall_s=time.perf_counter() - began, phases=phase_peaks(run / "log.jsonl"))
    if torch.cuda.is_available():
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def phase_peaks(log: Path) -> dict:
    """{phase: [peak allocated GB, peak reserved GB]} from the phase records of a run's log.jsonl
    (the highest per phase, as validation can run more than once). The cap limits reserved memory."""
    peaks: dict[str, list[float]] = {}
    if not log.exists():
        return peaks
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "phase" in record and record.get("peak_allocated_mb") is not None:
            now = [record["peak_allocated_mb"] * 2**20 / 1e9, record["peak_reserved_mb"] * 2**20 / 1e9]
            old = peaks.get(record["phase"], [0.0, 0.0])
            peaks[record["phase"]] = [round(max(a, b), 3) for a, b in zip(now, old)]
    return peaks


def reference_row(name: str, spec: dict, work: Path, reference: Path, tiny: bool, budget: float, log) -> dict:
    """train_dreambooth(_lora).py on the same model under the same cap and precision."""
    from reference_runner import reference_args, run_reference

    from dreambooth.models.builtin import builtin_path

    cap, forced, tf32 = CARDS[spec["card"]]
    model = builtin_path("tiny-random" if tiny else spec["model"])
    resolution = 64 if tiny else (768 if "sd21" in spec["model"] else 512)
    args = reference_args(spec["ref"], model, work / f"instance{resolution}", work / f"refclasses_{name}",
                          work / f"refout_{name}", num_class=4, max_steps=REF_STEPS + 1000, resolution=resolution)
    args[args.index("--sample_batch_size") + 1] = "1" if resolution == 768 else "2"  # as small as ours
    args += spec.get("extra", [])
    script = reference / ("train_dreambooth_lora.py" if spec["ref"] == "lora" else "train_dreambooth.py")
    os.environ.update(BENCH_CAP_GB="" if tiny else str(cap), BENCH_TF32="1" if tf32 else "0")
    precision = "no" if tiny else (forced or "bf16")
    result = run_reference(script, args, stop_after=REF_STEPS, budget_s=budget, mixed_precision=precision, log=log)
    result["precision"] = precision
    if "OutOfMemoryError" in result.get("error_tail", "") or "out of memory" in result.get("error_tail", ""):
        result["out_of_memory"] = True
    return result


def setup(work: Path, tiny: bool, rows: list[str]) -> None:
    """The subject photos at each resolution and the random-weight models the rows use (built once,
    cached)."""
    from sd15_random import write_subject_photos

    from dreambooth.models.builtin import builtin_path

    for size in ([64] if tiny else [512, 768, 1024]):
        write_subject_photos(work / f"instance{size}", size=size)
    for model in (["tiny-random"] if tiny else sorted({ROWS[r]["model"] for r in rows})):
        t = time.perf_counter()
        builtin_path(model)
        print(f"built {model} in {time.perf_counter() - t:.0f} s", flush=True)


def run_rows(args) -> None:
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path, log = args.out / "results.jsonl", open(args.out / "bench.log", "a", buffering=1)
    setup(args.work, args.tiny, args.rows.split(","))
    for name in args.rows.split(","):
        spec = ROWS[name]
        left = args.budget - (time.perf_counter() - began)
        budget = min(spec["budget"], left - 5)
        if budget < 40:
            result = {"skipped": f"{left:.0f} s left"}
        elif "ref" in spec:
            result = reference_row(name, spec, args.work, args.reference, args.tiny, budget, log)
        else:
            result = run_ours(name, spec, args, budget)
        row = {"row": name, "card": spec["card"], "cap_gb": CARDS[spec["card"]][0], **result}
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("error_tail", "notices")})[:900], flush=True)


def run_ours(name: str, spec: dict, args, budget: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(args.work),
           "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    result, returncode, text = run_worker_process(cmd, args.out / f"row_{name}.log", budget)
    if result is not None:
        return result
    return {"failed": True, "error_tail": text[-2000:], "over_budget": returncode == -9,
            "phases": phase_peaks(args.work / f"run_{name}" / "log.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, help="folder with train_dreambooth.py and train_dreambooth_lora.py")
    parser.add_argument("--out", type=Path, default=Path("tiers-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dreambooth-tiers"))
    parser.add_argument("--budget", type=float, default=560, help="seconds for the whole invocation")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny model at 64 px on the CPU: a dry run of every row")
    parser.add_argument("--worker")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DREAMBOOTH_CACHE", str(args.work / "cache"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if args.worker:
        result = ours_worker(args.worker, ROWS[args.worker], args.work, args.steps, args.tiny)
        print("RESULT " + json.dumps(result), flush=True)
        return
    run_rows(args)


if __name__ == "__main__":
    main()
