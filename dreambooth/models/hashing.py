"""Content hashes of model files, memoised so a 4 GB checkpoint is read once per change."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from dreambooth.models.builtin import cache_root


def file_digest(path: Path) -> str:
    """sha256 of the file, memoised by (path, size, mtime) so a 4 GB file is hashed once; a second
    thread asking for the same file meanwhile waits for the first one's result."""
    st = path.stat()
    memo_key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns]).encode()).hexdigest()
    memo = cache_root() / "identity" / f"file-{memo_key}.txt"
    with _lock_for(memo_key):
        if memo.exists():
            return memo.read_text().strip()
        value = _sha256_of(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    return value


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()  # releases the GIL on large updates: other threads run meanwhile
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())
