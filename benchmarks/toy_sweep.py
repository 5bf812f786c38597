"""DreamBooth recipe sweep on the toy world: which learning rate, mode and prior setting work.

Each variant trains on the demo's five subject photos from the `toy` base model and is scored by
the toy oracle every `--every` steps (subject fidelity on toy-context prompts, prompt fidelity,
language drift on "a photo of a dog"). Runs in fp32 so that a GPU sweep predicts the CPU demo.

    python benchmarks/toy_sweep.py --out sweep/ [--steps 400] [--every 50] [--subject dog]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = {
    "lora16-lr1e-3-te": ["train.mode=lora", "train.lora_rank=16", "train.lora_alpha=16", "train.lr=1e-3",
                         "train.train_text_encoder=true", "train.text_encoder_lr=1e-3"],
    "lora16-lr1e-3-te3e-4": ["train.mode=lora", "train.lora_rank=16", "train.lora_alpha=16", "train.lr=1e-3",
                             "train.train_text_encoder=true", "train.text_encoder_lr=3e-4"],
    "lora32-lr5e-4-te": ["train.mode=lora", "train.lora_rank=32", "train.lora_alpha=32", "train.lr=5e-4",
                         "train.train_text_encoder=true", "train.text_encoder_lr=5e-4"],
    "full-lr2e-5-te2e-5": ["train.lr=2e-5", "train.train_text_encoder=true", "train.text_encoder_lr=2e-5"],
    "full-lr3e-5-te1e-5": ["train.lr=3e-5", "train.train_text_encoder=true", "train.text_encoder_lr=1e-5"],
    "full-lr5e-5-te5e-5": ["train.lr=5e-5", "train.train_text_encoder=true", "train.text_encoder_lr=5e-5"],
    "lora16-lr1e-3-te-noprior": ["train.mode=lora", "train.lora_rank=16", "train.lora_alpha=16", "train.lr=1e-3",
                                 "train.train_text_encoder=true", "train.text_encoder_lr=1e-3", "prior.enabled=false"],
    "full-lr3e-5-te1e-5-noprior": ["train.lr=3e-5", "train.train_text_encoder=true", "train.text_encoder_lr=1e-5",
                                   "prior.enabled=false"],
}


def run_variant(name: str, extra: list[str], args, photos: Path) -> dict:
    from dreambooth.config import load_config
    from dreambooth.toyworld.render import SUBJECT_SPECS
    from dreambooth.training import events as ev
    from dreambooth.training import train_events

    overrides = {"data": {"images": str(photos), "class_noun": SUBJECT_SPECS[args.subject].class_name},
                 "train": {"steps": args.steps, "mixed_precision": "no"},
                 "eval": {"every": args.every, "scorer": "oracle", "subject": args.subject,
                          "num_per_prompt": args.per_prompt},
                 "output": {"checkpoint_every": 0, "sample_every": 0}}
    config = load_config("toy", overrides, extra)
    began, rows = time.perf_counter(), []
    for event in train_events(config, args.out / name, overwrite=True):
        if isinstance(event, ev.Evaluated):
            rows.append(event.scores)
            print(name, event.step, {k: event.scores.get(k) for k in ("fidelity", "prompt_fidelity", "drift")},
                  flush=True)
    return {"variant": name, "overrides": extra, "seconds": round(time.perf_counter() - began, 1), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--subject", default="dog")
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    from dreambooth.demo import write_subject_photos

    args.out.mkdir(parents=True, exist_ok=True)
    photos = args.out / "photos"
    write_subject_photos(photos, args.subject)
    results = []
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        results.append(run_variant(name, extra, args, photos))
        (args.out / f"sweep-{args.subject}.json").write_text(json.dumps(results, indent=1))
    contact_sheet(args.out, [r["variant"] for r in results]).save(args.out / f"sweep-{args.subject}.png")


def contact_sheet(out: Path, names: list[str]):
    """Each variant's last validation grid, side by side, labelled: to look at, not only to count."""
    from PIL import Image, ImageDraw

    grids = [Image.open(sorted((out / n / "samples").glob("*.png"))[-1]) for n in names]
    w, h = grids[0].size
    sheet = Image.new("RGB", (w * len(grids), h + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, grid) in enumerate(zip(names, grids)):
        sheet.paste(grid, (i * w, 14))
        draw.text((i * w + 2, 1), name, fill="black")
    return sheet


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
