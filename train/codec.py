"""Loading a frozen autoencoder: a Mirage autoencoder checkpoint or a diffusers-layout TAESD folder,
and, for a latent model, the codec its config names (path, hash and latent scale checked)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mirage.core.config import AutoencoderConfig, ConfigError, ModelConfig, from_json, to_json
from mirage.model.autoencoder import TAESD_WEIGHTS, Autoencoder, AutoencoderError, load_taesd_folder, load_weights
from mirage.model.latent import LatentCodec
from mirage.core.files import sha256_file
from mirage.train.checkpoint import CONFIG, WEIGHTS, CheckpointError, recover

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def load_autoencoder(path: str | Path, expect: AutoencoderConfig | None = None,
                     device: str | torch.device = "cpu") -> tuple[Autoencoder, dict]:
    """An autoencoder in eval mode from a Mirage checkpoint folder or a diffusers-layout TAESD folder.
    With `expect`, a checkpoint whose config differs is refused, naming both values."""
    folder = Path(path)
    if (folder / TAESD_WEIGHTS).is_file():
        model = load_taesd_folder(folder)
        meta = {"autoencoder": to_json(model.cfg), "step": None}
    else:
        recover(folder)  # finish or discard a save that was interrupted
        if not (folder / CONFIG).is_file():
            raise CheckpointError(f"{folder}: not an autoencoder checkpoint (no {CONFIG}); train one with "
                                  "`mirage-train --stage autoencoder` or pass a TAESD folder")
        try:
            meta = json.loads((folder / CONFIG).read_text())
            cfg = from_json(AutoencoderConfig, meta["autoencoder"])
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
            raise CheckpointError(f"{folder / CONFIG}: not an autoencoder config ({e!r})") from e
        model = Autoencoder(cfg)
        try:
            load_weights(model.taesd, folder / WEIGHTS)
        except AutoencoderError as e:
            raise CheckpointError(str(e)) from e
    if expect is not None:
        check_same_autoencoder(model.cfg, expect)
    return model.to(device).eval(), meta


def check_same_autoencoder(saved: AutoencoderConfig, wanted: AutoencoderConfig) -> None:
    """Refuse an autoencoder whose config differs from the one asked for, naming both values."""
    diffs = [f"{f.name}: checkpoint has {getattr(saved, f.name)!r}, asked for {getattr(wanted, f.name)!r}"
             for f in dataclasses.fields(AutoencoderConfig) if getattr(saved, f.name) != getattr(wanted, f.name)]
    if diffs:
        raise CheckpointError("autoencoder config mismatch; " + "; ".join(diffs))



def resolve_autoencoder(path: str) -> Path:
    """A latent config's autoencoder folder: relative to the working folder, else to the package
    (where the bundled checkpoints/ae-tiny lives)."""
    for folder in (Path(path), PACKAGE_ROOT / path):
        if folder.is_dir():
            return folder
    raise CheckpointError(f"autoencoder {path}: no such folder (here or in {PACKAGE_ROOT})")


def autoencoder_sha256(path: str) -> str:
    folder = resolve_autoencoder(path)
    weights = folder / (TAESD_WEIGHTS if (folder / TAESD_WEIGHTS).is_file() else WEIGHTS)
    return sha256_file(weights)


def load_codec(cfg: ModelConfig, device: str | torch.device = "cpu") -> LatentCodec:
    """The frozen codec of latent model `cfg`; a recorded hash that differs from the weights' is refused."""
    if not cfg.latent:
        raise ConfigError(f"model {cfg.name} works on pixels: it has no autoencoder")
    if cfg.autoencoder_sha256:
        actual = autoencoder_sha256(cfg.autoencoder)
        if actual != cfg.autoencoder_sha256:
            raise CheckpointError(f"autoencoder {cfg.autoencoder} is not the one this model was trained with "
                                  f"(sha256 {actual[:12]}... where the config records {cfg.autoencoder_sha256[:12]}...)")
    ae, _ = load_autoencoder(resolve_autoencoder(cfg.autoencoder), device=device)
    if ae.cfg.latent_channels != cfg.channels or ae.cfg.downscale * cfg.image_size != cfg.frame_size:
        raise ConfigError(f"autoencoder {cfg.autoencoder} makes {ae.cfg.latent_channels}-channel latents "
                          f"{ae.cfg.downscale}x down; model {cfg.name} expects {cfg.channels} channels and "
                          f"{cfg.frame_size // cfg.image_size}x")
    return LatentCodec(ae, cfg.latent_scale).to(device).eval().requires_grad_(False)
