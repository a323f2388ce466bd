"""Weights files a user brings (other projects' checkpoints), opened without reading their tensors, and checked.

A Wan 2.1 generator is 1.3B parameters (5.7 GB in float32): it must never sit in memory twice. A
.safetensors file is opened with `safe_open` and each tensor read when it is copied into the model;
a torch pickle (.pt / .pth) is opened with `torch.load(mmap=True, weights_only=True)`, so its
tensors are views of the mapped file until copied. Key names and shapes are compared with the
model's before anything is allocated for it.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from mirage.core.errors import CheckpointError  # noqa: F401 (re-exported: the one class for every weights file)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SHOWN = 4  # names listed per kind of mismatch; the counts say how many more


@dataclass(frozen=True)
class Entry:
    """One tensor of a weights file: its shape now, its data when `load` is called."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def tensor_entry(t: torch.Tensor) -> Entry:
    return Entry(tuple(t.shape), lambda: t)


def open_weights(path: Path):
    """A .safetensors file -> {name: Entry}; a torch pickle -> what it holds (tensors mapped, not read)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(path, framework="pt")
            return {k: Entry(tuple(handle.get_slice(k).get_shape()), lambda k=k: handle.get_tensor(k))
                    for k in handle.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format; give a .safetensors or "
                              f"{'/'.join(PICKLE_SUFFIXES)} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refuses pickled Python objects: they could run code
        raise CheckpointError(f"{path}: holds Python objects besides tensors; only tensor checkpoints are read "
                              f"(weights_only) ({str(e).splitlines()[0]})") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from e


def as_entries(state) -> dict[str, Entry]:
    """A flat {name: tensor or Entry} dict -> {name: Entry}."""
    return {k: v if isinstance(v, Entry) else tensor_entry(v) for k, v in state.items()}


def is_flat_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, (torch.Tensor, Entry)) for v in obj.values())


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise one CheckpointError line naming every kind of mismatch: missing, unexpected and mis-shaped keys."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    shaped = sorted(k for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
    if not (missing or extra or shaped):
        return
    parts = [f"{len(missing)} missing: {_names(missing)}" if missing else "",
             f"{len(extra)} unexpected: {_names(extra)}" if extra else "",
             f"{len(shaped)} mis-shaped: " + _names([f"{k} {tuple(found[k])} (model {tuple(expected[k])})"
                                                     for k in shaped]) if shaped else ""]
    raise CheckpointError(f"{what}: keys do not fit the model; " + "; ".join(p for p in parts if p))


def copy_into(module: torch.nn.Module, entries: dict[str, Entry]) -> None:
    """Copy each entry into the module's tensor of that name, one tensor at a time (cast to its dtype)."""
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, entry in entries.items():
            own[name].copy_(entry.load())
