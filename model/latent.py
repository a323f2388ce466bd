"""The frozen autoencoder as a latent model sees it: z = encode(image) * scale, image = decode(z / scale)."""
from __future__ import annotations

import torch
from torch import nn


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
