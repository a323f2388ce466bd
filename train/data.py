"""Training data: synthetic video made on the fly (deterministic by seed) or a folder of videos.

Synthetic clips: textured, rotating shapes moving and bouncing over a gray gradient, in
z-order so they occlude each other. A shape's color is fixed by its class and the
background is gray. The video-to-video task (`v2v_input`: full-resolution luma plus coarse
chroma in, full color out) has an exact ground truth, so PSNR measures it.

Every source returns clips as float32 arrays (T, H, W, 3) in [-1, 1].
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mirage.core.video_io import IMAGE_EXTS, VIDEO_EXTS, VideoError, iter_frames

# RGB per shape class: circle, square, triangle, ring, cross, diamond.
PALETTE = np.array([[0.95, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.4, 0.95],
                    [0.95, 0.8, 0.15], [0.85, 0.3, 0.85], [0.2, 0.85, 0.9]], dtype=np.float32)
# RGB -> (Y, Cb, Cr) rows (BT.601), applied to [-1, 1] values: Y stays in [-1, 1], Cb/Cr near 0.
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32)


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and what to do."""


def _sdf(kind: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of shape `kind` of radius r in shape-local coords."""
    if kind == 0:
        return np.hypot(x, y) - r
    if kind == 1:
        return np.maximum(abs(x), abs(y)) - 0.8 * r
    if kind == 2:  # equilateral triangle
        k = math.sqrt(3.0)
        return np.maximum(-y - 0.5 * r, (k * abs(x) + y) / 2 - 0.5 * r)
    if kind == 3:
        return abs(np.hypot(x, y) - 0.7 * r) - 0.3 * r
    if kind == 4:
        return np.minimum(np.maximum(abs(x) - r, abs(y) - 0.3 * r), np.maximum(abs(x) - 0.3 * r, abs(y) - r))
    return abs(x) + abs(y) - r


def _bounce(p0: float, v: float, lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    """Position at times t of a point moving at speed v, reflecting off lo and hi (triangle wave)."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(u < span, u, 2 * span - u)


class SyntheticVideo:
    """Clip `index` of a seeded, infinite family of synthetic videos."""

    def __init__(self, image_size: int, seed: int = 0, min_shapes: int = 2, max_shapes: int = 4):
        self.size, self.seed = image_size, seed
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self.gy, self.gx = np.meshgrid(c, c, indexing="ij")  # (H, W) each, pixel centers in [0, 1]

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        t = np.arange(start, start + length, dtype=np.float32)
        phi, g0, g1 = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45), rng.uniform(-0.25, 0.25)
        bg = g0 + g1 * ((self.gx - 0.5) * math.cos(phi) + (self.gy - 0.5) * math.sin(phi))
        frames = np.repeat(np.repeat(bg[None, :, :, None], 3, axis=3), length, axis=0)  # (T, H, W, 3)
        aa = self.size  # 1-pixel antialiasing ramp
        for _ in range(rng.integers(self.min_shapes, self.max_shapes + 1)):
            kind = int(rng.integers(len(PALETTE)))
            r = rng.uniform(0.1, 0.2)
            speed, heading = rng.uniform(0.01, 0.035), rng.uniform(0, 2 * np.pi)
            cx = _bounce(rng.uniform(r, 1 - r), speed * math.cos(heading), r, 1 - r, t)
            cy = _bounce(rng.uniform(r, 1 - r), speed * math.sin(heading), r, 1 - r, t)
            theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t
            texture, freq = int(rng.integers(3)), rng.uniform(1.5, 3.0)
            color = PALETTE[kind] * rng.uniform(0.65, 1.0)
            dx, dy = self.gx - cx[:, None, None], self.gy - cy[:, None, None]  # (T, H, W)
            cs, sn = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
            x, y = cs * dx + sn * dy, -sn * dx + cs * dy  # shape-local coordinates
            cover = np.clip(0.5 - _sdf(kind, x, y, r) * aa, 0.0, 1.0)[..., None]
            if texture == 1:  # stripes
                shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) > 0)
            elif texture == 2:  # checker
                shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) * np.sin(freq * math.pi * y / r) > 0)
            else:
                shade = np.ones_like(x)
            frames = frames * (1 - cover) + color * shade[..., None] * cover
        return (frames * 2 - 1).astype(np.float32)


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
