"""File hashing shared by checkpoints, autoencoders and artifacts."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # engines can be GBs: never read whole
            h.update(block)
    return h.hexdigest()
