"""Content hashes of model files, memoised so a 4 GB checkpoint is read once per change."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dreambooth.models.builtin import cache_root


def file_digest(path: Path) -> str:
    """sha256 of the file, memoised by (path, size, mtime) so a 4 GB file is hashed once."""
    st = path.stat()
    memo_key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns]).encode()).hexdigest()
    memo = cache_root() / "identity" / f"file-{memo_key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()
