"""Many subjects, one run directory each: `dreambooth batch MANIFEST.yaml` (manifest, run, status)."""
from dreambooth.batch.manifest import Batch, Subject, read_manifest
from dreambooth.batch.run import run_batch, run_subject
from dreambooth.batch.status import BatchStatus

__all__ = ["Batch", "BatchStatus", "Subject", "read_manifest", "run_batch", "run_subject"]
