"""The local web app (`dreambooth ui`): upload photos, train with live progress, generate, download.

Built on the library API (`train_events`, `check_images`, `generate`), never on the CLI. A small
Starlette app served by uvicorn (the `ui` extra) plus one static page.

    from dreambooth.ui import serve
    serve("127.0.0.1", 7860)
"""
from __future__ import annotations

from importlib.util import find_spec

from dreambooth.errors import DreamboothError, Problem


def serve(host: str = "127.0.0.1", port: int = 7860, workspace=None, allow_hosts: tuple[str, ...] = ()) -> int:
    """Run the web app until Ctrl-C or SIGTERM (see `server.serve`); says which extra to install if needed."""
    missing = [name for name in ("starlette", "uvicorn", "multipart") if find_spec(name) is None]
    if missing:
        raise DreamboothError("the web app needs the ui extra", [Problem(
            ", ".join(missing), 'not installed; run: pip install "dreambooth[ui]" (or pip install -e ".[ui]" '
            "in a checkout)")])
    from dreambooth.ui.server import serve as run  # imports starlette, so only once it is known to be there

    return run(host, port, workspace, allow_hosts=allow_hosts)


__all__ = ["serve"]
