"""Files in and out: the original single-file layout and its key mapping, diffusers folders, LoRA
files (kohya and PEFT layouts), their metadata, and the exporters that write them atomically."""
