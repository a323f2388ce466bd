"""Precomputed prompt embeddings read without torch: what a runtime that runs a prompt model (the video DiT)
takes instead of a text encoder. (mirage.model.text_encoder reads the same files, and .pt ones, with torch.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mirage.core.errors import MirageError

EMBEDS_FILES = (".safetensors", ".npy")


class PromptError(MirageError, ValueError):
    """A prompt embeddings file that cannot be read or is not one (L, width) tensor."""


def read_embeddings(path: str | Path) -> np.ndarray:
    """(L, width) float32 embeddings of a .safetensors file (one tensor, or a 'prompt_embeds' one) or a .npy
    file; a leading batch of one is dropped. The model checks the width and length (Pipeline.set_prompt)."""
    path = Path(path)
    if path.suffix not in EMBEDS_FILES:
        raise PromptError(f"{path}: prompt embeddings must be a {' or '.join(EMBEDS_FILES)} file here (a .pt file "
                          "needs PyTorch: save it with safetensors)")
    if not path.is_file():
        raise PromptError(f"{path}: prompt embeddings file not found")
    try:
        if path.suffix == ".npy":
            data = {"prompt_embeds": np.load(path, allow_pickle=False)}
        else:
            from safetensors.numpy import load_file

            data = load_file(path)
    except Exception as e:  # noqa: BLE001 (numpy and safetensors raise many types for a bad file)
        raise PromptError(f"{path}: cannot read prompt embeddings ({str(e).splitlines()[0]})") from e
    if "prompt_embeds" not in data and len(data) != 1:
        raise PromptError(f"{path}: expected one tensor or a 'prompt_embeds' entry, found {sorted(data)[:4]}")
    embeds = data.get("prompt_embeds", next(iter(data.values())))
    embeds = embeds[0] if embeds.ndim == 3 and embeds.shape[0] == 1 else embeds
    if embeds.ndim != 2:
        raise PromptError(f"{path}: prompt embeddings have shape {embeds.shape}; (L, width) or (1, L, width) expected")
    return embeds.astype(np.float32)
