"""The latent autoencoder: diffusers' AutoencoderTiny (the TAESD architecture), configured, not rewritten.

Frames (B, 3, H, W) in [-1, 1] <-> latents (B, latent_channels, H / 8, W / 8). `Autoencoder.encode`
returns what the diffusion model sees, `(raw - shift) * scaling_factor`, and `decode` undoes it.

Weights come from a Mirage checkpoint (train/autoencoder.py) or from a local folder holding
published TAESD weights in diffusers' layout (config.json + diffusion_pytorch_model.safetensors):
nothing is ever downloaded.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mirage.core.config import AutoencoderConfig, ConfigError
from mirage.core.errors import MirageError
from mirage.core.files import sha256_file

TAESD_CONFIG, TAESD_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
# AutoencoderTiny options our config does not carry; a folder that changes them is refused, not misread.
TAESD_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}


class AutoencoderError(MirageError, ValueError):
    """An autoencoder folder or weights file that cannot be used; the message names the path."""


class Autoencoder(nn.Module):
    """AutoencoderTiny plus the latent scaling of its config."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        try:
            from diffusers import AutoencoderTiny
        except ImportError as e:
            raise AutoencoderError("the autoencoder needs diffusers: pip install -e '.[latent]'") from e
        self.cfg = cfg
        self.taesd = AutoencoderTiny(
            in_channels=cfg.channels, out_channels=cfg.channels, latent_channels=cfg.latent_channels,
            encoder_block_out_channels=cfg.encoder_block_out_channels,
            decoder_block_out_channels=cfg.decoder_block_out_channels,
            num_encoder_blocks=cfg.num_encoder_blocks, num_decoder_blocks=cfg.num_decoder_blocks,
            scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift, **TAESD_FIXED)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, latent_channels, H / downscale, W / downscale)."""
        return (self.taesd.encoder(frames) - self.cfg.shift) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> (B, 3, h * downscale, w * downscale), about [-1, 1] (not clamped)."""
        return self.taesd.decoder(latents / self.cfg.scaling_factor + self.cfg.shift)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(frames))


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """A freshly initialised autoencoder, or, when cfg.weights names a TAESD folder, one holding its weights."""
    ae = Autoencoder(cfg)
    if cfg.weights:
        folder_cfg = read_taesd_config(cfg.weights)
        diffs = [f"{f}: folder has {getattr(folder_cfg, f)!r}, config has {getattr(cfg, f)!r}"
                 for f in ARCHITECTURE if getattr(folder_cfg, f) != getattr(cfg, f)]
        if diffs:
            raise AutoencoderError(f"{cfg.weights}: TAESD folder does not fit config {cfg.name!r}; " + "; ".join(diffs))
        load_weights(ae.taesd, Path(cfg.weights) / TAESD_WEIGHTS, cfg.sha256)
    return ae


# Fields that decide the weights' shapes and meaning; a TAESD folder must agree on all of them.
ARCHITECTURE = ("channels", "latent_channels", "encoder_block_out_channels", "decoder_block_out_channels",
                "num_encoder_blocks", "num_decoder_blocks", "scaling_factor", "shift")


def read_taesd_config(folder: str | Path) -> AutoencoderConfig:
    """The AutoencoderConfig of a diffusers-layout TAESD folder (its config.json), weights path included."""
    folder = Path(folder)
    file = folder / TAESD_CONFIG
    if not file.is_file():
        raise AutoencoderError(f"{folder}: not a TAESD folder (no {TAESD_CONFIG}); expected diffusers' layout "
                               f"with {TAESD_CONFIG} and {TAESD_WEIGHTS}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AutoencoderError(f"{file}: corrupt JSON ({e})") from e
    if raw.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise AutoencoderError(f"{file}: holds a {raw['_class_name']}, not an AutoencoderTiny (TAESD)")
    odd = {k: raw[k] for k, v in TAESD_FIXED.items() if raw.get(k, v) != v}
    if odd:
        raise AutoencoderError(f"{file}: unsupported AutoencoderTiny options {odd}; Mirage supports {TAESD_FIXED}")
    defaults = AutoencoderConfig()
    try:
        return dataclasses.replace(
            defaults, name="taesd", channels=raw.get("in_channels", 3),
            latent_channels=raw.get("latent_channels", 4),
            encoder_block_out_channels=tuple(raw.get("encoder_block_out_channels", (64,) * 4)),
            decoder_block_out_channels=tuple(raw.get("decoder_block_out_channels", (64,) * 4)),
            num_encoder_blocks=tuple(raw.get("num_encoder_blocks", (1, 3, 3, 3))),
            num_decoder_blocks=tuple(raw.get("num_decoder_blocks", (3, 3, 3, 1))),
            scaling_factor=float(raw.get("scaling_factor", 1.0)), shift=float(raw.get("shift_factor") or 0.0),
            weights=str(folder))
    except (ConfigError, TypeError) as e:
        raise AutoencoderError(f"{file}: not a usable AutoencoderTiny config ({e})") from e


def load_taesd_folder(folder: str | Path, sha256: str = "") -> Autoencoder:
    """Published TAESD weights from a local folder in diffusers' layout, in eval mode.
    The config it returns records the folder and the hash of its weights file."""
    cfg = read_taesd_config(folder)
    cfg = cfg.with_weights(cfg.weights, sha256 or file_sha256(Path(folder) / TAESD_WEIGHTS))
    return build_autoencoder(cfg).eval()


def file_sha256(file: Path) -> str:
    if not file.is_file():
        raise AutoencoderError(f"{file}: missing")
    return sha256_file(file)


def load_weights(module: nn.Module, file: Path, sha256: str = "") -> None:
    """Load a safetensors file into module (all keys, exact shapes), after checking its hash if one is given."""
    if sha256:
        digest = file_sha256(file)
        if digest != sha256:
            raise AutoencoderError(f"{file}: sha256 is {digest}, the config expects {sha256}")
    if not file.is_file():
        raise AutoencoderError(f"{file}: missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise AutoencoderError(f"{file}: unreadable safetensors ({e})") from e
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:  # missing, unexpected or mis-shaped keys: the weights belong to another layout
        raise AutoencoderError(f"{file}: weights do not fit the autoencoder config "
                               f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from e
