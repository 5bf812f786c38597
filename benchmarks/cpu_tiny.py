"""CPU timings of the tiny-random model: one training step, and the end-to-end CLI flow.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_tiny.py

Steady-state step time is the median over steps 5..N of log.jsonl's wall-clock stamps; the
end-to-end figure is check -> priors -> train (4 steps) -> generate, each as a fresh process,
exactly as `tests/test_cli_e2e.py` drives it (but with separate processes, as a user would).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["DREAMBOOTH_NO_PROGRESS"] = "1"


def cli(*args: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dreambooth", *args], check=True, capture_output=True)
    return time.perf_counter() - began


def main() -> None:
    from dreambooth.toyworld import render_subject

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DREAMBOOTH_CACHE"] = str(tmp / "cache")
        photos = tmp / "photos"
        photos.mkdir()
        for i in range(5):
            render_subject("dog", "plain", seed=i).save(photos / f"{i}.png")
        cli("token", "--count", "1")  # builds the tiny model once, outside the timings
        times = {
            "check": cli("check", str(photos), "--resolution", "64"),
            "priors (4 images, 2 steps)": cli("priors", "--model", "tiny-random", "--class-noun", "dog", "--num", "4",
                                              "--set", "prior.steps=2"),
            "train (4 steps, prior preservation)": cli("train", "--images", str(photos), "--class-noun", "dog",
                                                       "--preset", "tiny", "--output", str(tmp / "run")),
            "generate (2 images, 2 steps)": cli("generate", "--model", str(tmp / "run"), "--prompt", "a sks dog",
                                                "--num", "2", "--steps", "2", "--output", str(tmp / "gen")),
        }
        times["end to end"] = sum(times.values())
        cli("train", "--images", str(photos), "--class-noun", "dog", "--preset", "tiny", "--output",
            str(tmp / "long"), "--steps", "60", "--set", "output.checkpoint_every=0")
        log = map(json.loads, (tmp / "long" / "log.jsonl").read_text().splitlines())
        stamps = [r["time"] for r in log if "step" in r]  # step lines, not the phases' memory lines
        step = statistics.median(b - a for a, b in zip(stamps[4:], stamps[5:]))
    for name, seconds in times.items():
        print(f"{name:40s} {seconds:7.2f} s")
    print(f"{'one training step (median, batch 1+1, 64 px)':40s} {step * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
