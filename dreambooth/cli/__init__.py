"""The `dreambooth` command: argument parsing in `main`, the larger subcommands in `commands`."""
from dreambooth.cli.main import main

__all__ = ["main"]
