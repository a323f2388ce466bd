"""Training data: synthetic video made on the fly (deterministic by seed) or a folder of videos.

Synthetic clips: textured, rotating shapes moving and bouncing over a gray gradient, in
z-order so they occlude each other. A shape's color is fixed by its class and the
background is gray. The video-to-video task (`v2v_input`: full-resolution luma plus coarse
chroma in, full color out) has an exact ground truth, so PSNR measures it.

Every source returns clips as float32 arrays (T, H, W, 3) in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mirage.core.errors import MirageError
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import IMAGE_EXTS, VIDEO_EXTS, YCBCR, VideoError, iter_frames

class DataError(MirageError, ValueError):
    """A data source that cannot be used; the message names the path and what to do."""


def v2v_input(frames: torch.Tensor, chroma_factor: int = 4) -> torch.Tensor:
    """The video-to-video input of a (..., 3, H, W) clip in [-1, 1]: luma at full resolution
    plus chroma at 1/chroma_factor resolution (a colorization-with-hints task).

    Grayscale alone would leave colors ambiguous wherever two shapes share a brightness, and
    a model would then carry a wrong color through the context memory forever; the coarse
    chroma makes the ground truth recoverable from each input frame, so any drift a rollout
    shows is the model's own error accumulation.
    """
    rgb = frames.flatten(0, -4) if frames.dim() > 3 else frames[None]  # (N, 3, H, W)
    m = torch.as_tensor(YCBCR, device=frames.device, dtype=frames.dtype)
    ycc = torch.einsum("dc,nchw->ndhw", m, rgb)  # (N, 3, H, W): Y, Cb, Cr
    chroma = torch.nn.functional.avg_pool2d(ycc[:, 1:], chroma_factor)
    chroma = torch.nn.functional.interpolate(chroma, scale_factor=chroma_factor, mode="nearest")
    return torch.cat([ycc[:, :1], chroma], dim=1).reshape(frames.shape)


class VideoFolder:
    """Clips from a folder of video files and/or sub-folders of image sequences."""

    def __init__(self, root: str | Path, image_size: int, min_frames: int):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: not a folder; pass 'synthetic' or a folder of videos ({', '.join(VIDEO_EXTS)}) "
                            "or of image-sequence sub-folders")
        sources = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTS or (
            p.is_dir() and any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir())))
        if any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
            sources.append(root)
        if not sources:
            raise DataError(f"{root}: holds no videos ({', '.join(VIDEO_EXTS)}) and no image sequences")
        self.videos: list[np.ndarray] = []
        for src in sources:
            try:
                frames = np.stack(list(iter_frames(src, image_size)))
            except VideoError as e:
                raise DataError(str(e)) from e
            if len(frames) < min_frames:
                raise DataError(f"{src}: {len(frames)} frames, training needs clips of {min_frames}")
            self.videos.append(frames)

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        video = self.videos[index % len(self.videos)]
        start = start % (len(video) - length + 1)
        return video[start:start + length]


class ClipStream(torch.utils.data.IterableDataset):
    """Endless random clips (T, 3, H, W) from a source, seeded per (seed, rank, worker)."""

    def __init__(self, source, length: int, seed: int = 0, rank: int = 0, max_start: int = 200):
        self.source, self.length, self.seed, self.rank, self.max_start = source, length, seed, rank, max_start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, info.id if info else 0])
        while True:
            clip = self.source.clip(int(rng.integers(2**31)), self.length, int(rng.integers(self.max_start)))
            yield torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))  # (T, 3, H, W)


def make_source(data: str, image_size: int, clip_len: int, seed: int = 0):
    if data == "synthetic":
        return SyntheticVideo(image_size, seed)
    return VideoFolder(data, image_size, clip_len)
