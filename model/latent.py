"""The frozen autoencoder as a latent model sees it: z = encode(image) * scale, image = decode(z / scale)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mirage.core.config import AutoencoderConfig, ConfigError, DiTConfig, from_json
from mirage.model.autoencoder import Autoencoder, AutoencoderError, load_weights

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class LatentCodec(nn.Module):
    def __init__(self, autoencoder: nn.Module, scale: float):
        super().__init__()
        self.ae, self.scale = autoencoder, scale

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) frames in [-1, 1] -> (B, C, S / d, S / d) latents."""
        return self.ae.encode(image) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, h * d, w * d) frames, about [-1, 1] (not clamped)."""
        return self.ae.decode(z / self.scale)


class FrameCodec:
    """A per-frame LatentCodec seen as a video DiT's codec: latents (B, C, F, h, w) <-> frames (B, F, 3, H, W)
    in [-1, 1], each frame alone, so a block decodes (and encodes) with no memory of the blocks before it.
    Takes the place of the Wan VAE / TAEHV decoder in DiTPipeline (same `to`, `reset`, `decode`)."""

    def __init__(self, codec: LatentCodec):
        self.codec = codec

    def to(self, device, dtype) -> "FrameCodec":
        self.codec.to(device, dtype)
        return self

    def reset(self) -> None:
        """Nothing to forget: frames are coded one by one."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, f = latents.shape[0], latents.shape[2]
        z = latents.transpose(1, 2).flatten(0, 1).to(next(self.codec.parameters()).dtype)
        return self.codec.decode(z).unflatten(0, (b, f)).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        b, f = frames.shape[:2]
        x = frames.flatten(0, 1).to(next(self.codec.parameters()).dtype)
        return self.codec.encode(x).unflatten(0, (b, f)).transpose(1, 2)


class BlockCodec(nn.Module):
    """A FrameCodec on a DiT block as the DiT's `encode` / `decode` graphs lay it out (mirage.core.graphs):
    frames (B·N, 3, H, W), a row's N frames in a row, <-> latents (B, C, N, h, w). What the artifacts export
    and the PyTorch backend runs; the same math as FrameCodec (decoded frames clamped to [-1, 1])."""

    def __init__(self, frames: FrameCodec, block_frames: int):
        super().__init__()
        self.codec, self.frames, self.block_frames = frames.codec, frames, block_frames

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.frames.encode(image.unflatten(0, (-1, self.block_frames)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.frames.decode(z).flatten(0, 1)


def autoencoder_folder(cfg: DiTConfig) -> Path:
    """The folder of a DiT config's per-frame autoencoder: relative to the working folder, else to the package."""
    folder = next((f for f in (Path(cfg.autoencoder), PACKAGE_ROOT / cfg.autoencoder) if f.is_dir()), None)
    if folder is None:
        raise AutoencoderError(f"autoencoder {cfg.autoencoder} of {cfg.name}: no such folder (here or in {PACKAGE_ROOT})")
    return folder


def load_frame_codec(cfg: DiTConfig, device: str | torch.device = "cpu") -> FrameCodec:
    """The per-frame autoencoder a DiT config names (a Mirage autoencoder folder: config.json and
    model.safetensors), its recorded hash checked."""
    folder = autoencoder_folder(cfg)
    try:
        ae_cfg = from_json(AutoencoderConfig, json.loads((folder / "config.json").read_text())["autoencoder"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise AutoencoderError(f"{folder / 'config.json'}: not a Mirage autoencoder config ({e!r})") from e
    ae = Autoencoder(ae_cfg)
    load_weights(ae.taesd, folder / "model.safetensors", cfg.autoencoder_sha256)
    if ae_cfg.latent_channels != cfg.in_dim or (ae_cfg.downscale,) * 2 != cfg.vae_stride[1:]:
        raise ConfigError(f"autoencoder {cfg.autoencoder} makes {ae_cfg.latent_channels}-channel latents "
                          f"{ae_cfg.downscale}x down; {cfg.name} takes {cfg.in_dim} channels, stride {cfg.vae_stride[1:]}")
    codec = LatentCodec(ae, cfg.latent_scale).to(device).eval().requires_grad_(False)
    return FrameCodec(codec)
