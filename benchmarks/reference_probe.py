"""Run a Python script (argv[1], with the remaining arguments) and print torch's peak GPU memory
counters to stderr twice a second, so the benchmark can read the reference script's peak memory
without editing that script."""
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


if __name__ == "__main__":
    threading.Thread(target=_probe, daemon=True).start()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
