"""The TAEHV tiny video decoder (madebyollin/taehv, `taew2_1.pth` for Wan 2.1), written from its published layout.

Real-time Wan demos (Self-Forcing's demo.py) decode with it instead of the Wan VAE. The module
names are those of `TAEHV.decoder` in taehv.py, so the published file's `decoder.*` entries load
as they are (its `encoder.*` entries are not needed to decode and are skipped):

    decoder.0  Clamp (tanh(x / 3) * 3)        decoder.1  conv3x3 16 -> 256, ReLU
    decoder.3-5    MemBlock(256)   decoder.6 Upsample x2   decoder.7  TGrow(256, 1)  decoder.8  conv 256 -> 128
    decoder.9-11   MemBlock(128)   decoder.12 Upsample x2  decoder.13 TGrow(128, 2)  decoder.14 conv 128 -> 64
    decoder.15-17  MemBlock(64)    decoder.18 Upsample x2  decoder.19 TGrow(64, 2)   decoder.20 conv 64 -> 64
    decoder.21 ReLU                decoder.22 conv3x3 64 -> 3
    MemBlock: conv.0 / conv.2 / conv.4 (3x3, ReLU between) on [x, x of the previous frame], + x, ReLU
    TGrow: conv (1x1, no bias) to stride x channels, unfolded into stride frames

A latent frame becomes 4 frames (8x larger); the first 3 frames of a video are dropped, so T latent
frames give 1 + 4 (T - 1) frames, as the Wan VAE does. Decoding is block by block: each MemBlock keeps
the last frame it saw, so a clip decoded in blocks equals the clip decoded at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LATENT_CHANNELS = 16  # Wan 2.1's latent width
WIDTHS = (256, 128, 64, 64)
TIME_UPSCALE = (1, 2, 2)  # TAEHV's default decoder_time_upscale (False, True, True)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual conv block that also sees the previous frame's input (its memory)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()  # TAEHV's skip is a 1x1 conv only when widths differ; in the decoder they never do

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 conv to stride x channels, split in time."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


def _stage(n_in: int, n_out: int, time_stride: int) -> list[nn.Module]:
    return [MemBlock(n_in), MemBlock(n_in), MemBlock(n_in), nn.Upsample(scale_factor=2), TGrow(n_in, time_stride),
            _conv(n_in, n_out, bias=False)]


class TaehvDecoder(nn.Module):
    """(B, 16, T, h, w) Wan latents (the DiT's layout and normalised space) -> (B, T', 3, 8h, 8w) frames in [-1, 1]."""

    def __init__(self):
        super().__init__()
        w = WIDTHS
        self.decoder = nn.Sequential(
            Clamp(), _conv(LATENT_CHANNELS, w[0]), nn.ReLU(),
            *_stage(w[0], w[1], TIME_UPSCALE[0]), *_stage(w[1], w[2], TIME_UPSCALE[1]),
            *_stage(w[2], w[3], TIME_UPSCALE[2]), nn.ReLU(), _conv(w[3], 3))
        self.frames_to_trim = 1
        for s in TIME_UPSCALE:
            self.frames_to_trim *= s
        self.frames_to_trim -= 1  # the first latent frame gives one video frame
        self.reset()

    def reset(self) -> None:
        """Start a new video: no memory, and its first frames are trimmed."""
        self._memory: dict[int, torch.Tensor] = {}
        self._started = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of a video; frames continue the blocks decoded since `reset`."""
        b, _, t = latents.shape[:3]
        x = latents.transpose(1, 2).reshape(b * t, latents.shape[1], *latents.shape[3:])  # TAEHV works on (B T) C h w
        x = x.to(self.decoder[1].weight.dtype)
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                frames = x.reshape(b, -1, *x.shape[1:])
                past = self._memory.get(i, torch.zeros_like(frames[:, :1]))
                self._memory[i] = frames[:, -1:]
                x = layer(x, torch.cat([past, frames[:, :-1]], 1).reshape(x.shape))
            else:
                x = layer(x)
        frames = x.reshape(b, -1, *x.shape[1:]).clamp(0, 1) * 2 - 1
        if not self._started:
            self._started = True
            frames = frames[:, self.frames_to_trim:]
        return frames
