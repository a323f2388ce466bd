"""TAEHV, the tiny video autoencoder (madebyollin/taehv, `taew2_1.pth` for Wan 2.1), written from its published layout.

Real-time Wan demos (Self-Forcing's demo.py) decode with it instead of the Wan VAE, and its encoder turns an
input video into the DiT's latents for video-to-video. The module names are those of `TAEHV.encoder` and
`TAEHV.decoder` in taehv.py, so the published file's `encoder.*` and `decoder.*` entries load as they are:

    encoder.0  conv3x3 3 -> 64, ReLU
    encoder.2  TPool(64, 2)   encoder.3  conv3x3 stride 2 (no bias)   encoder.4-6    MemBlock(64)
    encoder.7  TPool(64, 2)   encoder.8  conv3x3 stride 2 (no bias)   encoder.9-11   MemBlock(64)
    encoder.12 TPool(64, 1)   encoder.13 conv3x3 stride 2 (no bias)   encoder.14-16  MemBlock(64)
    encoder.17 conv3x3 64 -> 16

    decoder.0  Clamp (tanh(x / 3) * 3)        decoder.1  conv3x3 16 -> 256, ReLU
    decoder.3-5    MemBlock(256)   decoder.6 Upsample x2   decoder.7  TGrow(256, 1)  decoder.8  conv 256 -> 128
    decoder.9-11   MemBlock(128)   decoder.12 Upsample x2  decoder.13 TGrow(128, 2)  decoder.14 conv 128 -> 64
    decoder.15-17  MemBlock(64)    decoder.18 Upsample x2  decoder.19 TGrow(64, 2)   decoder.20 conv 64 -> 64
    decoder.21 ReLU                decoder.22 conv3x3 64 -> 3
    MemBlock: conv.0 / conv.2 / conv.4 (3x3, ReLU between) on [x, x of the previous frame], + x, ReLU
    TPool: `stride` frames stacked in channels, a 1x1 conv (no bias) back to one frame
    TGrow: conv (1x1, no bias) to stride x channels, unfolded into stride frames

Decoding: a latent frame becomes 4 frames (8x larger); the first 3 frames of a video are dropped, so T
latent frames give 1 + 4 (T - 1) frames, as the Wan VAE does. Encoding: 4 frames become one latent frame
(8x smaller). A video's first block is given as many frames as its decoding gives back, 4N - 3 for N latent
frames: its first frame is repeated 3 times in front (the 3 frames decoding drops; Wan's first latent frame
stands for the first video frame alone), so a round trip returns every input frame in its place. (taehv.py's
own encode_video pads nothing in front, and its round trip loses the first 3 frames.) Both directions stream
block by block: each MemBlock keeps the last frame it saw, so a clip coded in blocks equals it coded at once;
an encoded block must hold whole TPool groups (a multiple of 4 frames, the padded first block included).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the layout lives in core, where the runtime's codec graphs (mirage.core.graphs.taehv_graphs) read it too
from mirage.core.taehv_layout import ENCODER_WIDTH, LATENT_CHANNELS, MEMBLOCKS, TIME_DOWNSCALE, TIME_UPSCALE, \
    WARM_UP_FRAMES, WIDTHS


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
        self.skip = nn.Identity()  # TAEHV's skip is a 1x1 conv only when widths differ; in taew2_1 they never do

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """`stride` frames -> one: stacked in channels, then a 1x1 conv back to the width."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x):
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 conv to stride x channels, split in time."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


def _stream(layers: nn.Sequential, x: torch.Tensor, batch: int,
            memory: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `layers` on a block's frames (B·T, C, h, w) -> (B, T', C', h', w'), and each MemBlock's new memory. Each
    MemBlock sees, for every frame, the frame before it: within the block, or for its first frame the last one it
    saw of the block before (`memory`: one (B, C, h, w) per MemBlock, in order; None: zeros, a video's start)."""
    new = []
    for layer in layers:
        if isinstance(layer, MemBlock):
            frames = x.reshape(batch, -1, *x.shape[1:])
            past = torch.zeros_like(frames[:, 0]) if memory is None else memory[len(new)]
            new.append(frames[:, -1])
            x = layer(x, torch.cat([past[:, None], frames[:, :-1]], 1).reshape(x.shape))
        else:
            x = layer(x)
    return x.reshape(batch, -1, *x.shape[1:]), new


def _stage(n_in: int, n_out: int, time_stride: int) -> list[nn.Module]:
    return [*(MemBlock(n_in) for _ in range(MEMBLOCKS)), nn.Upsample(scale_factor=2), TGrow(n_in, time_stride),
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
        self.frames_to_trim = WARM_UP_FRAMES  # the first latent frame gives one video frame
        self.reset()

    def reset(self) -> None:
        """Start a new video: no memory, and its first frames are trimmed."""
        self._memory: list[torch.Tensor] | None = None
        self._started = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of a video; frames continue the blocks decoded since `reset`."""
        frames, self._memory = _decode_block(self.decoder, latents, self._memory)
        if not self._started:
            self._started = True
            frames = frames[:, self.frames_to_trim:]
        return frames


class Taehv(TaehvDecoder):
    """TAEHV with its encoder too: `encode` (B, T, 3, H, W) frames in [-1, 1] -> (B, 16, T/4, H/8, W/8) latents
    (the video's first block: T + 3, see the module's docstring), streaming like `decode`."""

    def __init__(self):
        super().__init__()
        n = ENCODER_WIDTH
        stages = [[TPool(n, stride), nn.Conv2d(n, n, 3, stride=2, padding=1, bias=False),
                   *(MemBlock(n) for _ in range(MEMBLOCKS))] for stride in TIME_DOWNSCALE]
        self.encoder = nn.Sequential(_conv(3, n), nn.ReLU(), *(m for stage in stages for m in stage),
                                     _conv(n, LATENT_CHANNELS))
        self.time_downscale = math.prod(TIME_DOWNSCALE)

    def reset(self) -> None:
        """Start a new video: no memory in either direction; its first block is padded when encoded and trimmed
        when decoded."""
        super().reset()
        self._encoder_memory: list[torch.Tensor] | None = None
        self._encoding = False

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the next block of a video; its latents continue the blocks encoded since `reset`."""
        if not self._encoding:
            self._encoding = True
            frames = torch.cat([frames[:, :1].expand(-1, self.frames_to_trim, -1, -1, -1), frames], 1)
        t = frames.shape[1]
        if t % self.time_downscale:
            raise ValueError(f"TAEHV encodes {self.time_downscale} frames per latent frame; a block of {t} frames "
                             f"(the first block's padding included) does not divide")
        z, self._encoder_memory = _encode_block(self.encoder, frames, self._encoder_memory)
        return z


def _decode_block(decoder: nn.Sequential, z: torch.Tensor, memory: Sequence[torch.Tensor] | None) \
        -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 16, N, h, w) latents and the decoder's memory -> (B, 4N, 3, H, W) frames in [-1, 1], its new memory."""
    b, c, n = z.shape[:3]
    x = z.transpose(1, 2).reshape(b * n, c, *z.shape[3:]).to(decoder[1].weight.dtype)  # TAEHV works on (B T) C h w
    frames, new = _stream(decoder, x, b, memory)
    return frames.clamp(0, 1) * 2 - 1, new  # TAEHV gives [0, 1]


def _encode_block(encoder: nn.Sequential, frames: torch.Tensor, memory: Sequence[torch.Tensor] | None) \
        -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 4N, 3, H, W) frames in [-1, 1] and the encoder's memory -> (B, 16, N, h, w) latents, its new memory."""
    x = (frames.flatten(0, 1).to(encoder[0].weight.dtype) + 1) / 2  # TAEHV takes [0, 1]
    z, new = _stream(encoder, x, len(frames), memory)
    return z.transpose(1, 2), new


def _forget(memory: Sequence[torch.Tensor], fresh: torch.Tensor) -> list[torch.Tensor]:
    """The memory a block sees: zeros in the rows where fresh (B,) is 1 (a video's first block)."""
    return [torch.where(_rows(fresh, m), 0, m) for m in memory]


def _rows(fresh: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return fresh.view(-1, *(1,) * (like.dim() - 1)) > 0.5


class TaehvBlockCodec(nn.Module):
    """TAEHV as the DiT's codec graphs lay it out (mirage.core.graphs.taehv_graphs): `encode` and `decode` as pure
    functions of (inputs, state) -> (outputs, new state) over a Taehv's weights, a block of N latent frames <->
    4N video frames per row, each row its own video. Streamed block by block they equal Taehv.encode / decode of
    the same video, with the decoder's warm-up frames kept and the encoder's input carried 3 frames over (see
    taehv_graphs). What the artifacts export and the PyTorch backend runs."""

    def __init__(self, taehv: TaehvDecoder, block_frames: int):
        super().__init__()
        self.taehv, self.frames = taehv, block_frames * math.prod(TIME_DOWNSCALE)

    def decode(self, z: torch.Tensor, fresh: torch.Tensor, *memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 16, N, h, w), fresh (B,), the decoder's memory -> (B·4N, 3, H, W) in [-1, 1], its new memory."""
        frames, new = _decode_block(self.taehv.decoder, z, _forget(memory, fresh))
        return (frames.flatten(0, 1), *new)

    def encode(self, image: torch.Tensor, fresh: torch.Tensor, carry: torch.Tensor,
               *memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B·4N, 3, H, W) in [-1, 1], fresh (B,), the last 3 frames of the block before (B, 3, 3, H, W), the
        encoder's memory -> (B, 16, N, h, w), the next carry, the new memory."""
        frames = image.unflatten(0, (-1, self.frames))
        first = frames[:, :1].expand(-1, WARM_UP_FRAMES, -1, -1, -1)
        video = torch.cat([torch.where(_rows(fresh, carry), first, carry), frames[:, :-WARM_UP_FRAMES]], 1)
        z, new = _encode_block(self.taehv.encoder, video, _forget(memory, fresh))
        return (z, frames[:, -WARM_UP_FRAMES:], *new)
