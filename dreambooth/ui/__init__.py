"""The local web app (`dreambooth ui`): upload photos, train with live progress, generate, download.

Built on the library API (`train_events`, `check_images`, `generate`), never on the CLI. Standard
library HTTP server plus one static page, so it needs no extra install.

    from dreambooth.ui import serve
    serve("127.0.0.1", 7860)
"""
from .server import serve

__all__ = ["serve"]
