"""`dreambooth batch MANIFEST.yaml`: train many subjects, on Ray or a local pool of GPU workers."""
from __future__ import annotations

import threading

from dreambooth.batch import read_manifest, run_batch
from dreambooth.batch.status import status_path
from dreambooth.training.loop import stop_on_signals


def cmd_batch(args) -> int:
    batch = read_manifest(args.manifest, args.output)  # the whole manifest is checked before anything runs
    print(f"{len(batch.subjects)} subjects; status in {status_path(batch.folder)}")
    stop = threading.Event()
    with stop_on_signals(stop) as caught:
        status = run_batch(batch, backend=args.backend, workers=args.workers, ray_address=args.ray_address,
                           stop=stop, print_line=lambda line: print(line, flush=True))
    print(status.summary())
    if caught:
        return 128 + caught[0]
    counts = status.counts()
    return 0 if counts["done"] + counts["skipped"] == len(batch.subjects) else 1
