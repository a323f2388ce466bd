"""File hashing and modes shared by checkpoints, autoencoders and artifacts."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # engines can be GBs: never read whole
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | Path) -> None:
    """Give `path` the mode open() would have (0666, a folder 0777, less the umask): writers that go through a
    temporary file (mkdtemp, safetensors' save_file) leave 0600 / 0700, unreadable to anyone else."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())
