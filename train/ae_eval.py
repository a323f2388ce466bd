"""Autoencoder reconstruction quality: PSNR and SSIM of decode(encode(frame)) on held-out clips.

Held-out means a data seed the training never drew from (training uses its --seed, 0 for the
bundled ae-tiny) and, for the photo pans, content unlike anything synthetic.
"""
from __future__ import annotations

import numpy as np
import torch

from mirage.core.metrics import SSIM_DEFINITION
from mirage.model.autoencoder import Autoencoder
from mirage.model.ssim import psnr, ssim
from mirage.train.data import make_source

HELD_OUT_SEED = 1000


@torch.no_grad()
def reconstruction_quality(model: Autoencoder, data: str, size: int, seed: int = HELD_OUT_SEED, clips: int = 11,
                           frames: int = 3, batch: int = 4, device: str | torch.device = "cpu") -> dict:
    """Mean / min PSNR (dB) and mean SSIM over `clips` clips x `frames` frames of a source at size x size.
    Also returns one (input, reconstruction) pair as uint8 (H, W, 3) arrays for a picture."""
    source = make_source(data, size, frames, seed)
    video = np.concatenate([source.clip(i, frames) for i in range(clips)])  # (clips * frames, H, W, 3)
    x = torch.from_numpy(video).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) in [-1, 1]
    recon = torch.cat([model(chunk.to(device)).clamp(-1, 1).cpu() for chunk in x.split(batch)])
    x01, r01 = (x + 1) / 2, (recon + 1) / 2
    p, s = psnr(r01, x01), ssim(r01, x01)
    to_u8 = lambda t: (t.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)  # noqa: E731
    return {"data": data, "size": size, "seed": seed, "frames": len(x), "psnr": float(p.mean()),
            "psnr_min": float(p.min()), "ssim": float(s.mean()), "ssim_definition": SSIM_DEFINITION,
            "example": (to_u8(x01[0]), to_u8(r01[0]))}
