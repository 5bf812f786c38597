"""Training: pure losses, batches, the loop, checkpoints and resume, progress events."""
from dreambooth.training.loop import train, train_events

__all__ = ["train", "train_events"]
