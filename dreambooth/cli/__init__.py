"""The `dreambooth` command: the parser and `main` in `cli.main`, the commands in `cli.train` and `cli.commands`."""
from dreambooth.cli.main import main

__all__ = ["main"]
