"""Training data: synthetic video made on the fly (deterministic by seed) or a folder of videos.

Synthetic clips: textured, rotating shapes moving and bouncing over a gray gradient, in
z-order so they occlude each other. A shape's color is fixed by its class and the
background is gray. The video-to-video task (`v2v_input`: full-resolution luma plus coarse
chroma in, full color out) has an exact ground truth, so PSNR measures it.

Detailed clips (`DetailedVideo`, up to 512x512 and beyond) add what a camera gives: a world
of fine textures (smooth grain, stripes, checkers, text-like glyphs) seen through a panning and
zooming camera, changing light, and foreground shapes that occlude it. Texture scales are in
pixels, so a 128x128 clip has the same per-pixel detail as a 512x512 one (an autoencoder trained
on small frames sees the statistics of large ones). `PhotoPans` pans and zooms slowly over the
photographs that scikit-image ships inside its wheel: real content with no download, kept for
held-out evaluation.

Every source returns clips as float32 arrays (T, H, W, 3) in [-1, 1].
"""
from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import torch

from mirage.core.errors import MirageError
from mirage.core.synthetic import PALETTE, SyntheticVideo, _bounce, _sdf
from mirage.core.video_io import IMAGE_EXTS, VIDEO_EXTS, YCBCR, VideoError, iter_frames

class DataError(MirageError, ValueError):
    """A data source that cannot be used; the message names the path and what to do."""


def _axis_weights(lo: np.ndarray, step: np.ndarray, size: int, limit: int):
    """Bilinear taps along one axis: view pixel i samples source coordinate lo + (i + 0.5) * step - 0.5.
    lo, step (T,) -> indices i0 (T, size) and weights f (T, size, 1) of the upper neighbour."""
    pos = lo[:, None] + (np.arange(size, dtype=np.float32) + 0.5) * step[:, None] - 0.5
    pos = np.clip(pos, 0, limit - 1.001)
    i0 = pos.astype(np.int64)
    return i0, (pos - i0)[..., None].astype(np.float32)


def camera_view(image: np.ndarray, top: np.ndarray, left: np.ndarray, side: np.ndarray, size: int) -> np.ndarray:
    """Frames (T, size, size, C) of square windows (top, left, side: (T,), source pixels) of image (H, W, C),
    resampled bilinearly; separable, so a 512x512 view costs two 1-D gathers."""
    frames = np.empty((len(top), size, size, image.shape[2]), dtype=np.float32)
    yi, fy = _axis_weights(top, side / size, size, image.shape[0])
    xi, fx = _axis_weights(left, side / size, size, image.shape[1])
    for t in range(len(top)):  # in-place lerps (a += (b - a) * f): each pass over a 512x512 frame counts
        x0, x1 = xi[t, 0], xi[t, -1] + 2  # only the columns this view touches
        rows, below = image[yi[t], x0:x1], image[yi[t] + 1, x0:x1]  # (size, w, C) each
        below -= rows
        below *= fy[t, :, None]
        rows += below
        cols = xi[t] - x0
        left, right = rows[:, cols], rows[:, cols + 1]  # (size, size, C) each
        right -= left
        right *= fx[t]
        np.add(left, right, out=frames[t])
    return frames


# 48 text-like glyphs: 7x5 random bit patterns in an 8x6 cell (one blank row and column as spacing).
_GLYPHS = np.zeros((48, 8, 6), dtype=np.float32)
_GLYPHS[:, :7, :5] = np.random.default_rng(1234).random((48, 7, 5)) < 0.45


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One (h, w) texture in [0, 1] with pixel-scale detail: noise, stripes, checkers or glyph text."""
    kind = int(rng.integers(5))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # grain: smooth noise with 1.5-4 px features (i.i.d. pixel noise no codec keeps is left out)
        k, side = rng.uniform(1.5, 4.0), max(h, w)
        grain = rng.random((int(side / k) + 2, int(side / k) + 2, 1), dtype=np.float32)
        zero = np.zeros(1, np.float32)
        grain = camera_view(grain, zero, zero, zero + side / k, side)[0, :h, :w, 0]  # bilinear upsampling
        return 0.5 + (grain - 0.5) * rng.uniform(0.3, 0.9)
    if kind in (1, 2):  # stripes (smooth or hard) at 3-20 px per period, any orientation
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 20)
        wave = np.sin(2 * np.pi * (x * math.cos(theta) + y * math.sin(theta)) / period)
        return 0.5 + 0.5 * (wave if kind == 1 else np.sign(wave)) * rng.uniform(0.4, 1.0)
    if kind == 3:  # checker, 2-16 px squares
        cell = rng.uniform(2, 16)
        return ((x // cell + y // cell) % 2).astype(np.float32) * rng.uniform(0.3, 1.0)
    k = int(rng.integers(1, 4))  # glyph text, 1-3 px per glyph dot, dark ink on light paper
    ids = rng.integers(len(_GLYPHS), size=(h // (8 * k) + 1, w // (6 * k) + 1))
    ids[rng.random(ids.shape) < 0.15] = 0
    page = _GLYPHS[ids].transpose(0, 2, 1, 3).reshape(ids.shape[0] * 8, ids.shape[1] * 6)  # (rows*8, cols*6)
    return 0.9 - 0.75 * page.repeat(k, 0).repeat(k, 1)[:h, :w]


class DetailedVideo:
    """Clip `index` of a seeded family of camera-like videos at any size: a textured world under a
    panning, zooming camera with changing light and occluding foreground shapes."""

    def __init__(self, image_size: int, seed: int = 0, patches: tuple[int, int] = (12, 24)):
        self.size, self.seed, self.patches = image_size, seed, patches
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self.gy, self.gx = np.meshgrid(c, c, indexing="ij")  # (H, W) each, pixel centers in [0, 1]

    def world(self, rng: np.random.Generator) -> np.ndarray:
        """The (C, C, 3) canvas in [0, 1] the camera looks at, C = 2 x the frame size."""
        side = 2 * self.size
        coarse = rng.uniform(0.15, 0.85, (4, 4, 3)).astype(np.float32)  # a smooth colored backdrop
        zero = np.zeros(1, np.float32)
        canvas = camera_view(coarse, zero, zero, zero + 4, side)[0]
        for _ in range(int(rng.integers(*self.patches))):
            h, w = (int(v) for v in rng.integers(self.size // 6 + 4, 4 * self.size // 5 + 8, size=2))
            top, left = int(rng.integers(0, side - h)), int(rng.integers(0, side - w))
            tex = _texture(rng, h, w)[..., None]
            ink, paper = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
            patch = paper * tex + ink * (1 - tex)
            if rng.random() < 0.5:  # elliptical patch with a 1-pixel soft edge, else a rectangle
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                r = np.hypot((yy + 0.5) / h - 0.5, (xx + 0.5) / w - 0.5) * 2
                cover = np.clip((1 - r) * min(h, w) / 2, 0, 1)[..., None]
            else:
                cover = 1.0
            region = canvas[top:top + h, left:left + w]
            region[...] = region * (1 - cover) + patch * cover
        return canvas

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        canvas = self.world(rng)
        side = canvas.shape[0]
        t = np.arange(start, start + length, dtype=np.float32)
        # camera: the window (z x the frame size) breathes around z0 (zoom), its center bounces at 0.3-1.5%
        # of a frame a step (pan); z <= 1.0 * e^0.15 < 1.2, so a half-window stays under 0.6 frames
        z = rng.uniform(0.6, 1.0) * np.exp(rng.uniform(0.0, 0.15) * np.sin(rng.uniform(0.02, 0.08) * t
                                                                             + rng.uniform(0, 2 * np.pi)))
        window = (z * self.size).astype(np.float32)
        speed, heading = rng.uniform(0.003, 0.015) * self.size, rng.uniform(0, 2 * np.pi)
        half = 0.6 * self.size
        cy = _bounce(rng.uniform(half, side - half), speed * math.sin(heading), half, side - half, t)
        cx = _bounce(rng.uniform(half, side - half), speed * math.cos(heading), half, side - half, t)
        frames = camera_view(canvas, (cy - window / 2).astype(np.float32), (cx - window / 2).astype(np.float32),
                             window, self.size)
        # light: a global gain and a drifting linear gradient, both slow
        gain = 1 + rng.uniform(0.05, 0.25) * np.sin(rng.uniform(0.03, 0.1) * t + rng.uniform(0, 2 * np.pi))
        phi = rng.uniform(0, 2 * np.pi) + 0.02 * t
        slope = rng.uniform(0.0, 0.3)
        ramp = self.gx[0] - 0.5  # (W,): the gradient is separable, light = gain + a(x) + b(y)
        for i in range(length):
            light = (gain[i] + slope * math.sin(phi[i]) * ramp)[:, None] + slope * math.cos(phi[i]) * ramp
            frames[i] *= light[..., None]  # light (H, W): row term along H, column term along W
        self._occlude(rng, frames, t)
        return _to_signed(frames)

    def _occlude(self, rng: np.random.Generator, frames: np.ndarray, t: np.ndarray) -> None:
        """Foreground shapes moving over the frames in place; computed inside each shape's box only."""
        size = self.size
        for _ in range(int(rng.integers(1, 4))):
            kind, r = int(rng.integers(len(PALETTE))), rng.uniform(0.08, 0.2)
            speed, heading = rng.uniform(0.005, 0.02), rng.uniform(0, 2 * np.pi)
            cx = _bounce(rng.uniform(r, 1 - r), speed * math.cos(heading), r, 1 - r, t)
            cy = _bounce(rng.uniform(r, 1 - r), speed * math.sin(heading), r, 1 - r, t)
            theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.05, 0.05) * t
            color = rng.uniform(0.05, 0.95, 3).astype(np.float32)
            period = rng.uniform(0.1, 0.5) * r
            for i in range(len(t)):
                y0, y1 = max(0, int((cy[i] - r) * size) - 1), min(size, int((cy[i] + r) * size) + 2)
                x0, x1 = max(0, int((cx[i] - r) * size) - 1), min(size, int((cx[i] + r) * size) + 2)
                dx, dy = self.gx[y0:y1, x0:x1] - cx[i], self.gy[y0:y1, x0:x1] - cy[i]
                x = math.cos(theta[i]) * dx + math.sin(theta[i]) * dy  # shape-local coordinates
                y = -math.sin(theta[i]) * dx + math.cos(theta[i]) * dy
                cover = np.clip(0.5 - _sdf(kind, x, y, r) * size, 0.0, 1.0)[..., None]
                shade = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * x / period))[..., None]
                box = frames[i, y0:y1, x0:x1]
                box[...] = box * (1 - cover) + color * shade * cover


# Photographs inside scikit-image's wheel (no download): color ones, and gray textures shown as RGB.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel")


class PhotoPans:
    """Slow pans and zooms over scikit-image's bundled photographs: real content, no download.
    Clip `index` looks at photo index % len(PHOTOS) along a path drawn from (seed, index)."""

    def __init__(self, image_size: int, seed: int = 0):
        self.size, self.seed = image_size, seed
        self.photos = _load_photos(max_side=int(image_size / 0.6))

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        photo = self.photos[index % len(self.photos)]
        h, w = photo.shape[:2]
        t = np.arange(start, start + length, dtype=np.float32)
        base = min(h, w) * rng.uniform(0.6, 0.85)
        window = (base * (1 + 0.1 * np.sin(rng.uniform(0.01, 0.04) * t + rng.uniform(0, 2 * np.pi)))).astype(np.float32)
        half = base * 0.55
        speed, heading = rng.uniform(0.002, 0.006) * min(h, w), rng.uniform(0, 2 * np.pi)
        cy = _bounce(rng.uniform(half, h - half), speed * math.sin(heading), half, h - half, t)
        cx = _bounce(rng.uniform(half, w - half), speed * math.cos(heading), half, w - half, t)
        frames = camera_view(photo, (cy - window / 2).astype(np.float32), (cx - window / 2).astype(np.float32),
                             window, self.size)
        return _to_signed(frames)


def _to_signed(frames: np.ndarray) -> np.ndarray:
    """[0, 1] float32 frames -> [-1, 1], clipped, in place."""
    np.clip(frames, 0, 1, out=frames)
    frames *= 2
    frames -= 1
    return frames


def _load_photos(max_side: int) -> list[np.ndarray]:
    """The photos as float (H, W, 3) in [0, 1], shrunk (Lanczos, antialiased) to a short side of at most
    max_side: views then resample near 1:1, which is fast and free of aliasing."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataError("the 'photos' source needs scikit-image: pip install -e '.[latent]'") from e
    from PIL import Image

    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        scale = max_side / min(img.shape[:2])
        if scale < 1:
            img = np.asarray(Image.fromarray(img).resize((round(img.shape[1] * scale), round(img.shape[0] * scale)),
                                                         Image.LANCZOS))
        photos.append(img.astype(np.float32) / 255.0)
    return photos


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


def batches(stream: torch.utils.data.IterableDataset, batch_size: int, workers: int, pin_memory: bool):
    """An endless iterator of batches of `stream`, made by `workers` processes. The workers ignore
    SIGINT and SIGTERM: Ctrl-C and `timeout` signal the whole process group, and a worker that died
    of it would end the run with a DataLoader error before the training loop could save."""
    return iter(torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                                            worker_init_fn=_ignore_stop_signals if workers else None))


def _ignore_stop_signals(_worker_id: int) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


SOURCES = {"synthetic": SyntheticVideo, "detailed": DetailedVideo, "photos": PhotoPans}


def make_source(data: str, image_size: int, clip_len: int, seed: int = 0):
    """'synthetic', 'detailed', 'photos' (made on the fly) or a folder of videos / image sequences."""
    if data in SOURCES:
        return SOURCES[data](image_size, seed)
    return VideoFolder(data, image_size, clip_len)
