"""Writing exports so that nothing half-written is ever left at, or next to, the target.

Every export is built under a hidden temporary name beside its target (`dreambooth.atomic`) and
moved into place only when complete, never over an existing file. An error, Ctrl-C or SIGTERM
removes the temporary; a process killed outright leaves one behind, so each export first prunes
temporaries whose process no longer runs. Write errors become an `ExportError` that names the
cause (disk full, read-only folder), which the CLI reports with exit code 2.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from dreambooth.atomic import replace_folder, temporary_name
from dreambooth.errors import DreamboothError, Problem

_CAUSES = {errno.ENOSPC: "the disk is full: free space or choose another --output",
           errno.EDQUOT: "the disk quota is exceeded: free space or choose another --output",
           errno.EACCES: "no permission to write here: choose a writable --output folder",
           errno.EPERM: "no permission to write here: choose a writable --output folder",
           errno.EROFS: "the file system is read-only: choose a writable --output folder"}


class ExportError(DreamboothError):
    """An export could not be written (disk full, read-only folder, interrupted); nothing was left."""


class ExportInterrupted(BaseException):
    """Raised inside an export by SIGTERM, so the same cleanup as for Ctrl-C runs."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """During the block SIGTERM raises ExportInterrupted (as Ctrl-C raises KeyboardInterrupt), so
    `finally` cleanups run. Only the main thread can own signal handlers; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise ExportInterrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def named_write_errors(output: Path) -> Iterator[None]:
    """Turn OS errors and interruptions while writing `output` into an ExportError naming the cause."""
    try:
        with sigterm_raises():
            yield
    except (KeyboardInterrupt, ExportInterrupted) as e:
        raise ExportError(f"export to {output} interrupted", [Problem(
            str(output), "stopped by Ctrl-C or SIGTERM; the partial export was removed")]) from e
    except OSError as e:
        cause = _CAUSES.get(e.errno, f"{e.strerror or e}; nothing was written")
        raise ExportError(f"cannot write {output}", [Problem(str(e.filename or output), cause)]) from e


def write_file_atomically(output: Path, write: Callable[[Path], None]) -> Path:
    """Write to a hidden temporary file beside `output`, then link it into place: `os.link` fails
    instead of replacing a file that appeared meanwhile."""
    tmp = temporary_name(output)
    try:
        write(tmp)
        os.link(tmp, output)
    except FileExistsError as e:
        raise ExportError("export target exists", [Problem(str(output), "already exists; not overwritten")]) from e
    finally:
        tmp.unlink(missing_ok=True)
    return output


def write_folder_atomically(output: Path, write: Callable[[Path], None]) -> Path:
    """Folder version: build in a hidden temporary folder beside `output`, then rename it into place,
    unless `output` appeared meanwhile."""
    try:
        return replace_folder(output, write, if_exists="error")
    except FileExistsError as e:
        if Path(e.filename or "") != output:
            raise  # something inside the folder, not the target itself
        raise ExportError("export target exists", [Problem(str(output), "already exists; not overwritten")]) from e
