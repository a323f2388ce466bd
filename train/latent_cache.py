"""A latent model's training clips, encoded once: the latent cache.

A latent model learns on its frozen encoder's latents. Encoding every batch afresh costs, per
clip, K+1 frames plus the video-to-video input through the encoder, and making the frames costs
more still (a 9-frame 512x512 `detailed` clip takes 0.25 s of a CPU core: that bounded a run on
two H100s at 1.6 steps/s, docs/QUALITY.md). With TrainConfig.latent_cache = N (`mirage-train
--latent-cache N`) a run makes and encodes N clips once, keeps their latents on the training
device and draws every batch from them: each clip is then seen about steps x batch / N times, so
N sets the variety the run trains on. A resumed run encodes a fresh set.

    cache = LatentCache.build(frame_batches, codec, n, v2v=True, device=dev)
    latents, cond = next(cache.batches(batch_size, seed))   # (B, K+1, C, h, w), (B, C, h, w)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm import tqdm

from mirage.core.errors import MirageError
from mirage.train.data import v2v_input


def encode_batch(codec, clips: torch.Tensor, v2v: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frames (B, K+1, 3, H, W) in [-1, 1] -> their latents (B, K+1, C, h, w) and, video-to-video,
    the encoded input of the last frame (B, C, h, w), which the model is conditioned on."""
    b, length = clips.shape[:2]
    with torch.no_grad():
        cond = codec.encode(v2v_input(clips[:, -1])) if v2v else None
        return codec.encode(clips.flatten(0, 1)).unflatten(0, (b, length)), cond


class CacheInterrupted(MirageError):
    """Ctrl-C while the cache was being made, before any training step."""


@dataclass
class LatentCache:
    latents: torch.Tensor  # (N, K+1, C, h, w)
    cond: torch.Tensor | None  # (N, C, h, w), video-to-video only

    @classmethod
    def build(cls, frame_batches: Iterator[torch.Tensor], codec, n: int, v2v: bool, device: torch.device,
              progress: bool = True, seconds: float = math.inf) -> "LatentCache":
        """Encode the first n clips of `frame_batches` (batches of (B, K+1, 3, H, W) frames), or fewer: as many
        as `seconds` of encoding make (it stops after the batch that reaches them, one batch at least)."""
        latents, conds, have, start = [], [], 0, time.monotonic()
        with tqdm(total=n, desc="encode clips", unit="clip", disable=not progress) as bar:
            try:
                while have < n and (not latents or time.monotonic() - start < seconds):
                    clips = next(frame_batches)[: n - have].to(device, non_blocking=True)
                    z, cond = encode_batch(codec, clips, v2v)
                    latents.append(z)
                    conds.append(cond)
                    have += len(z)
                    bar.update(len(z))
            except KeyboardInterrupt:  # before the first step: there is nothing to save
                raise CacheInterrupted(f"interrupted while encoding the latent cache ({have} of {n} clips): "
                                       "nothing was trained or saved") from None
        return cls(torch.cat(latents), torch.cat(conds) if v2v else None)

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Endless batches of clips drawn with replacement, seeded."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            index = torch.randint(len(self.latents), (batch_size,), generator=generator).to(self.latents.device)
            yield self.latents[index], None if self.cond is None else self.cond[index]
