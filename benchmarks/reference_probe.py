"""Run a Python script (argv[1], with the remaining arguments) and print torch's peak GPU memory
counters to stderr twice a second, so the benchmark can read the reference script's peak memory
without editing that script. BENCH_CAP_GB (a memory cap, GB) and BENCH_TF32 (0 or 1) emulate a
smaller or older card the same way benchmarks/tiers.py does for our runs."""
import os
import runpy
import sys
import threading
import time


def _probe() -> None:
    import torch

    while True:
        time.sleep(0.5)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print(f"MEMPROBE {torch.cuda.max_memory_allocated()} {torch.cuda.max_memory_reserved()}",
                  file=sys.stderr, flush=True)


def _emulate_card() -> None:
    import torch

    if not torch.cuda.is_available():
        return
    if os.environ.get("BENCH_TF32") in ("0", "1"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = os.environ["BENCH_TF32"] == "1"
    if os.environ.get("BENCH_CAP_GB"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["BENCH_CAP_GB"]) * 1e9 / total))


if __name__ == "__main__":
    _emulate_card()
    threading.Thread(target=_probe, daemon=True).start()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
