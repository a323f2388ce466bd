"""Precomputed prompt embeddings read without torch: what a runtime that runs a prompt model (the video DiT)
takes instead of a text encoder: one prompt's file, or a bank of named ones that a server's clients pick from
(PromptBank). (mirage.model.text_encoder reads the same files, and .pt ones, with torch.)"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

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
    data = _read(path, "prompt embeddings")
    if "prompt_embeds" not in data and len(data) != 1:
        raise PromptError(f"{path}: expected one tensor or a 'prompt_embeds' entry, found {sorted(data)[:4]}")
    return _embeds(data.get("prompt_embeds", next(iter(data.values()))), path)


def read_bank(path: str | Path) -> dict[str, np.ndarray]:
    """A prompt bank: a .safetensors file of named embeddings, {name: (L, width) float32} (a leading batch of
    one dropped), for a server without a text encoder: a control's prompt names one of them."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PromptError(f"{path}: a prompt bank is a .safetensors file of named (L, width) embeddings")
    data = _read(path, "prompt bank")
    if not data:
        raise PromptError(f"{path}: a prompt bank with no entries")
    return {name: _embeds(embeds, path, name) for name, embeds in sorted(data.items())}


def check_embeddings(embeds: np.ndarray, text_shape: tuple[int, int], what: str) -> None:
    """`embeds` fit a model whose prompts are (text_len, width) (`text_shape`): width equal, 1 <= L <= text_len."""
    length, width = text_shape
    if embeds.shape[1] != width or not 1 <= embeds.shape[0] <= length:
        raise PromptError(f"{what}: embeddings of shape {embeds.shape}; the model takes (L, {width}) with "
                          f"1 <= L <= {length}")


class PromptBank:
    """Prompt text -> embeddings for Pipeline's `prompt_encoder`: a bank name's entry, else what `encode` (a
    text encoder; None: none) makes of the text. Without a text encoder an unknown name is refused with some
    of the bank's names."""

    SHOWN = 8  # names listed in a refusal

    def __init__(self, bank: dict[str, np.ndarray], encode: Callable[[str], np.ndarray] | None = None):
        self.bank, self.encode = bank, encode

    @property
    def names(self) -> list[str]:
        return sorted(self.bank)

    def __call__(self, prompt: str) -> np.ndarray:
        if prompt in self.bank:
            return self.bank[prompt]
        if self.encode is not None:
            return self.encode(prompt)
        shown = ", ".join(repr(n) for n in self.names[:self.SHOWN])
        more = f" and {len(self.bank) - self.SHOWN} more" if len(self.bank) > self.SHOWN else ""
        raise PromptError(f"prompt {prompt[:40]!r} is not in the prompt bank, and there is no text encoder: give "
                          f"one of its names ({shown}{more})")


def _read(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise PromptError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".npy":
            return {"prompt_embeds": np.load(path, allow_pickle=False)}
        from safetensors.numpy import load_file

        return load_file(path)
    except Exception as e:  # noqa: BLE001 (numpy and safetensors raise many types for a bad file)
        raise PromptError(f"{path}: cannot read {what} ({str(e).splitlines()[0]})") from e


def _embeds(embeds: np.ndarray, path: Path, name: str | None = None) -> np.ndarray:
    """One entry as (L, width) float32: a leading batch of one dropped."""
    embeds = embeds[0] if embeds.ndim == 3 and embeds.shape[0] == 1 else embeds
    if embeds.ndim != 2:
        where = f"{path}" if name is None else f"{path}, entry {name!r}"
        raise PromptError(f"{where}: prompt embeddings have shape {embeds.shape}; (L, width) or (1, L, width) expected")
    return embeds.astype(np.float32)
