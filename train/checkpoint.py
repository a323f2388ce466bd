"""Checkpoints: a folder with safetensors weights and the configs as JSON.

    config.json              {"model": ModelConfig, "train": TrainConfig, "step": ..., ...}
    model.safetensors        EMA weights: what sampling and export use
    train_state.safetensors  raw weights + AdamW moments, only needed to resume training

Writes go to a temporary file first and are renamed into place, so an interrupted save
never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mirage import __version__

from mirage.core.errors import MirageError
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, from_json, to_json
from mirage.model.unet import MirageUNet

CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "train_state.safetensors"


class CheckpointError(MirageError, ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: str | Path, model: MirageUNet, ema: MirageUNet, train_cfg: TrainConfig, step: int,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create checkpoint folder ({e.strerror})") from e
    meta = {"model": to_json(model.cfg), "train": to_json(train_cfg), "step": step,
            "mirage_version": __version__, **(extra or {})}
    _atomic(out / WEIGHTS, lambda p: save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, p))
    if optimizer is not None:
        state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        opt = optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for name, value in slots.items():
                state[f"opt.{idx}.{name}"] = torch.as_tensor(value).contiguous()
        meta["param_groups"] = opt["param_groups"]
        _atomic(out / STATE, lambda p: save_file(state, p))
    _atomic(out / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def read_meta(path: str | Path) -> dict:
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".safetensors" else folder
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: not a Mirage checkpoint (no {CONFIG}); "
                              "train one with `mirage-train` or pass the bundled checkpoints/tiny")
    try:
        return json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CONFIG}: corrupt JSON ({e})") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MirageUNet, dict]:
    """Load the EMA model of a checkpoint folder (or its model.safetensors) in eval mode."""
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".safetensors" else folder
    meta = read_meta(folder)
    try:
        cfg = from_json(ModelConfig, meta["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{folder / CONFIG}: bad model config ({e})") from e
    model = MirageUNet(cfg)
    _load_into(model, folder / WEIGHTS, prefix="")
    return model.to(device).eval(), meta


def _load_into(model: torch.nn.Module, file: Path, prefix: str) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({e})") from e
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # size mismatches: the weights belong to another config
        raise CheckpointError(f"{file}: weights do not fit the model config ({str(e).splitlines()[1].strip()})") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{file}: weights do not fit the model config (missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
    return tensors


def load_train_state(folder: str | Path, model: MirageUNet, ema: MirageUNet,
                     optimizer: torch.optim.Optimizer) -> dict:
    """Restore raw weights, EMA weights and AdamW state for resuming; returns the meta dict."""
    folder = Path(folder)
    meta = read_meta(folder)
    _load_into(ema, folder / WEIGHTS, prefix="")
    tensors = _load_into(model, folder / STATE, prefix="model.")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
