"""Frame I/O shared by training data and the runtime: numpy only, no torch.

Frames are float32 arrays (H, W, 3) in [-1, 1]. Videos are read with imageio-ffmpeg (an
ffmpeg binary ships inside its wheel, so nothing is downloaded at run time); image
sequences are folders of PNG/JPEG files read with Pillow, in name order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class VideoError(ValueError):
    """A video or image folder that cannot be read or written; the message names the path."""


def to_float(frame_u8: np.ndarray) -> np.ndarray:
    return frame_u8.astype(np.float32) / 127.5 - 1.0


def to_uint8(frame: np.ndarray) -> np.ndarray:
    return np.clip((frame + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def fit_square(frame_u8: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square, then resize to size x size (bicubic)."""
    from PIL import Image

    h, w = frame_u8.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(frame_u8[top:top + s, left:left + s, :3])
    if s != size:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def iter_frames(path: str | os.PathLike, size: int) -> Iterator[np.ndarray]:
    """Yield frames of a video file, an image folder, or a webcam (its index as a string,
    "0" -> /dev/video0 through ffmpeg's v4l2 input, Linux) as float (size, size, 3) arrays."""
    if str(path).isdigit():
        yield from _read_ffmpeg(f"/dev/video{path}", size, ["-f", "v4l2"])
        return
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise VideoError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTS)})")
        from PIL import Image, UnidentifiedImageError

        for f in files:
            try:
                frame = np.asarray(Image.open(f).convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise VideoError(f"{f}: unreadable image ({e})") from e
            yield to_float(fit_square(frame, size))
        return
    if path.suffix.lower() not in VIDEO_EXTS:
        raise VideoError(f"{path}: not a video ({', '.join(VIDEO_EXTS)}) or image folder")
    yield from _read_ffmpeg(str(path), size)


def _read_ffmpeg(source: str, size: int, input_params: list[str] | None = None) -> Iterator[np.ndarray]:
    import imageio_ffmpeg

    if source.startswith("/dev/video") and not Path(source).exists():
        raise VideoError(f"{source}: no such webcam")
    count = 0
    try:
        reader = imageio_ffmpeg.read_frames(source, input_params=input_params)
        meta = next(reader)
        w, h = meta["size"]
        for raw in reader:
            count += 1
            yield to_float(fit_square(np.frombuffer(raw, np.uint8).reshape(h, w, 3), size))
    except (OSError, RuntimeError, StopIteration, KeyError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoError(f"{source}: unreadable video ({reason})") from e
    if count == 0:
        raise VideoError(f"{source}: video has no frames")


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 16, scale: int = 4) -> int:
    """Write frames ([-1, 1] floats) to .mp4 / .gif, or to a folder of PNGs for any other path.

    Small frames are upscaled `scale` times with nearest-neighbour so a 32x32 demo is visible.
    Returns the number of frames written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix not in (".mp4", ".gif"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoError(f"{path}: cannot create output ({e.strerror})") from e
    from PIL import Image

    def big(frame: np.ndarray) -> np.ndarray:
        u8 = to_uint8(frame)
        return np.repeat(np.repeat(u8, scale, axis=0), scale, axis=1) if scale > 1 else u8

    n = 0
    if suffix == ".mp4":
        import imageio_ffmpeg

        writer = None
        try:
            for frame in frames:
                u8 = big(frame)
                if writer is None:
                    writer = imageio_ffmpeg.write_frames(str(path), (u8.shape[1], u8.shape[0]), fps=fps,
                                                         macro_block_size=1, quality=8)
                    writer.send(None)
                writer.send(np.ascontiguousarray(u8))
                n += 1
        finally:
            if writer is not None:
                writer.close()
    elif suffix == ".gif":
        images = [Image.fromarray(big(f)) for f in frames]
        if images:
            images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        n = len(images)
    else:
        for frame in frames:
            Image.fromarray(big(frame)).save(path / f"{n:05d}.png")
            n += 1
    return n
