"""Frame I/O shared by training data and the runtime: numpy only, no torch.

Frames are float32 arrays (H, W, 3) in [-1, 1]. Videos are read and written with imageio-ffmpeg (an
ffmpeg binary ships inside its wheel, so nothing is downloaded at run time), or with OpenCV where
mirage was installed without its dependencies beside an OpenCV (GPU images often hold opencv but not
imageio-ffmpeg, whose wheel is 68 MB); image sequences are folders of PNG/JPEG files read with Pillow,
in name order.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mirage.core.errors import MirageError

# RGB -> (Y, Cb, Cr) rows (BT.601), applied to [-1, 1] values: Y stays in [-1, 1], Cb/Cr near 0.
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32)

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class VideoError(MirageError, ValueError):
    """A video or image folder that cannot be read or written; the message names the path."""


def to_float(frame_u8: np.ndarray) -> np.ndarray:
    return frame_u8.astype(np.float32) / 127.5 - 1.0


def to_uint8(frame: np.ndarray) -> np.ndarray:
    return np.clip((frame + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def as_uint8(frame: np.ndarray) -> np.ndarray:
    """A frame as bytes: float frames in [-1, 1] through to_uint8; uint8 frames (a pipeline with
    frames="uint8") as they are, no copy."""
    return frame if frame.dtype == np.uint8 else to_uint8(frame)


def as_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a model's frames given as one side (square) or as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def center_crop(h: int, w: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest centered window of an h x w frame with the aspect of `shape`
    (height, width): the part that, scaled to `shape`, covers it (a square model's: the center square)."""
    height, width = shape
    ch, cw = min(h, round(w * height / width)), min(w, round(h * width / height))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def fit_frame(frame_u8: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Scale to cover `size` (a side, or (height, width)) and center-crop to it: the center window of the
    model's aspect (center_crop), resized to it (bicubic)."""
    from PIL import Image

    height, width = as_shape(size)
    top, left, ch, cw = center_crop(*frame_u8.shape[:2], (height, width))
    img = Image.fromarray(frame_u8[top:top + ch, left:left + cw, :3])
    if (ch, cw) != (height, width):
        img = img.resize((width, height), Image.BICUBIC)
    return np.asarray(img)


# Inputs are center-cropped to the model's aspect and resized to its size. A frame whose shorter side is below this
# has no picture left to enlarge (a 2x2 video becomes flat blocks), so it is refused; a larger one
# that is still smaller than the model's frames is enlarged, and mirage-run says so.
MIN_INPUT_SIDE = 16


def _check_side(w: int, h: int, source) -> None:
    if min(h, w) < MIN_INPUT_SIDE:
        raise VideoError(f"{source}: frames are {w}x{h}; an input needs at least {MIN_INPUT_SIDE} pixels on its "
                         "shorter side")


def _fit(frame_u8: np.ndarray, size: int | tuple[int, int], source) -> np.ndarray:
    """fit_frame of one input frame of `source`, refusing one below MIN_INPUT_SIDE."""
    _check_side(frame_u8.shape[1], frame_u8.shape[0], source)
    return fit_frame(frame_u8, size)


def input_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of the first frame of a video file or image folder, read before a model
    loads, and refused as iter_frames would refuse it; None for a webcam (known once it streams)."""
    check_source(path)
    path = Path(path)
    if str(path).isdigit():
        return None
    if path.is_dir():
        first = min((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS), default=None)
        if first is None:
            return None  # iter_frames names the problem
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(first) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError) as e:
            raise VideoError(f"{first}: unreadable image ({e})") from e
    elif path.suffix.lower() in VIDEO_EXTS:
        reader = _decode(str(path))
        try:
            w, h = next(reader)
        finally:
            reader.close()
    else:
        return None  # iter_frames names the problem
    _check_side(w, h, path)
    return w, h


def check_source(path: str | os.PathLike) -> None:
    """What iter_frames checks before it reads: a webcam index, or a path that exists."""
    if not str(path).isdigit() and not Path(path).exists():
        raise VideoError(f"{path}: no such file or folder")


def iter_frames(path: str | os.PathLike, size: int | tuple[int, int]) -> Iterator[np.ndarray]:
    """Yield frames of a video file, an image folder, or a webcam (its index as a string,
    "0" -> /dev/video0 through ffmpeg's v4l2 input, Linux) as float (size, size, 3) arrays, or (height, width, 3)
    for a `size` of (height, width) (fit_frame)."""
    return (to_float(frame) for frame in iter_frames_u8(path, size))


def iter_frames_u8(path: str | os.PathLike, size: int | tuple[int, int]) -> Iterator[np.ndarray]:
    """iter_frames' frames as they were decoded: uint8 (height, width, 3), no float copy (mirage-run's reader)."""
    check_source(path)
    if str(path).isdigit():
        yield from _read_ffmpeg(f"/dev/video{path}", size, ["-f", "v4l2"])
        return
    path = Path(path)
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
            yield _fit(frame, size, f)
        return
    if path.suffix.lower() not in VIDEO_EXTS:
        raise VideoError(f"{path}: not a video ({', '.join(VIDEO_EXTS)}) or image folder")
    yield from _read_ffmpeg(str(path), size)


def _read_ffmpeg(source: str, size: int | tuple[int, int],
                 input_params: list[str] | None = None) -> Iterator[np.ndarray]:
    if source.startswith("/dev/video") and not Path(source).exists():
        raise VideoError(f"{source}: no such webcam")
    reader = _decode(source, input_params)
    next(reader)  # the size
    count = 0
    for frame in reader:
        count += 1
        yield _fit(frame, size, source)
    if count == 0:
        raise VideoError(f"{source}: video has no frames")


def _video_library() -> str:
    """The library that reads and writes video files here: imageio_ffmpeg (mirage's dependency), else cv2."""
    for name in ("imageio_ffmpeg", "cv2"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise VideoError("video files need imageio-ffmpeg (pip install imageio-ffmpeg) or OpenCV; image folders do not")


def _decode(source: str, input_params: list[str] | None = None) -> Iterator:
    """A video's (width, height) first, then its RGB uint8 frames; any decoder error as one VideoError line."""
    try:
        if _video_library() == "imageio_ffmpeg":
            import imageio_ffmpeg

            reader = imageio_ffmpeg.read_frames(source, input_params=input_params)
            meta = next(reader)
            w, h = meta["size"]
            yield w, h
            count = 0
            for raw in reader:
                count += 1
                yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            _check_complete(count, (meta.get("duration") or 0) * (meta.get("fps") or 0))
            return
        import cv2

        capture = cv2.VideoCapture(int(source[len("/dev/video"):]) if source.startswith("/dev/video") else source)
        try:
            ok, bgr = capture.read()
            if not ok:
                raise OSError("OpenCV cannot decode it")
            yield bgr.shape[1], bgr.shape[0]
            count = 0
            while ok:
                count += 1
                yield np.ascontiguousarray(bgr[..., ::-1])
                ok, bgr = capture.read()
            _check_complete(count, capture.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            capture.release()
    except (OSError, RuntimeError, StopIteration, KeyError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoError(f"{source}: unreadable video ({reason})") from e


def _check_complete(count: int, declared: float) -> None:
    """A video that stops well short of the frames its header declares is broken at the next one: ffmpeg ends a
    truncated file's frames without an error (a clip cut mid-download, a recording whose writer died), and the
    run would take the frames before it for the whole clip. A variable frame rate decodes to at least as many
    (ffmpeg repeats frames up to the nominal rate); a webcam declares none (0, nan or inf: not checked)."""
    expected = round(declared) if np.isfinite(declared) and declared > 0 else 0
    if count + max(2, expected // 20) < expected:
        raise OSError(f"frame {count + 1} cannot be decoded: the video stops after {count} of the {expected} frames "
                      "its header declares, a truncated or corrupt file")


OUTPUT_FORMATS = (".mp4", ".gif")  # or a folder (no suffix) of PNG frames
FRAMES_MARK = ".mirage-frames"  # in each folder of PNG frames a VideoWriter makes: the next one may replace it
_FRAME_NAME = re.compile(r"\d{5,}\.png")  # the frames a VideoWriter writes there (00000.png, ...)


def check_not_input(output: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """Refuse an output that is the input (the same path in another spelling, through a symlink or
    a hard link): writing it would destroy the frames being read."""
    if source is None or str(source).isdigit() or not Path(source).exists():
        return  # a webcam, 'synthetic' or a missing path (check_source names that)
    if same_path(output, source):
        raise VideoError(f"{output} is the input {source}; write the output somewhere else")


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path in another spelling, through a symlink or a hard link."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


class VideoWriter:
    """Frames ([-1, 1] floats, or uint8 as to_uint8 makes them) streamed to .mp4 / .gif, or to a folder of PNGs for a path with no
    suffix. The path and its format are checked when the writer opens, before any frame is made;
    `close()` finishes a valid file with the frames written so far (also after an interruption).
    A video file, or a folder of PNG frames, is written to a hidden sibling and renamed over `path` by
    close() when it holds a frame, so an output already there is replaced whole or not at all (a killed
    process leaves it as it was; an earlier run's extra frames never stay beside a shorter run's). A folder
    is replaced only if it is empty or a VideoWriter made it and holds only its frames (FRAMES_MARK and
    NNNNN.png): anything else there is someone's files, and the writer refuses it when it opens.

    A run that fails after its first frame (a broken input frame, a full disk) is not the output asked for:
    leaving the writer with an exception (or `close(failed=True)`) keeps its frames as `kept`, the path's
    name with ".partial" (out.partial.mp4, out.partial/), and leaves `path` as it was.

    Small frames are upscaled `scale` times with nearest-neighbour so a 32x32 demo is visible
    (None: to at least 128 pixels wide).

    Every frame given is a frame of the file, also in a GIF: Pillow's multi-frame GIF save merges a
    frame identical to the one before it (after quantization) into it, adding up their durations, and
    no option stops that (Pillow 13's GifImagePlugin._write_multiple_frames), so a still stretch of a
    video lost frames and a reader counted too few. The GIF is therefore written here, frame by frame
    as they come, with Pillow's public GIF pieces (getheader, getdata): each frame whole, with its own
    colour table (the adaptive palette Pillow's save would give it) and the same delay.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, scale: int | None = None):
        self.path, self.fps, self.scale, self.count = Path(path), fps, scale, 0
        self.suffix = self.path.suffix.lower()
        if self.suffix and self.suffix not in OUTPUT_FORMATS:
            raise VideoError(f"{self.path}: cannot write {self.suffix} videos; use .mp4, .gif or a folder name "
                             "(no suffix) for PNG frames")
        if not self.suffix:
            check_frames_folder(self.path)
        target = self.path.parent
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".mirage-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise VideoError(f"{self.path}: cannot write here ({e.strerror})") from e
        # the suffix stays last: ffmpeg picks the container by it
        self._partial = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{self.suffix}")
        self._ffmpeg = None
        self._gif = None  # the open GIF file, after its first frame
        self.kept: Path | None = None  # where a failed run's frames are (close(failed=True))

    def write(self, frame: np.ndarray) -> None:
        u8 = as_uint8(frame)
        if self.scale is None:
            self.scale = max(1, 128 // u8.shape[1])
        if self.scale > 1:
            u8 = np.repeat(np.repeat(u8, self.scale, axis=0), self.scale, axis=1)
        if self.suffix == ".mp4":
            if self._ffmpeg is None:
                self._ffmpeg = _encoder(self._partial, u8.shape[1], u8.shape[0], self.fps)
            self._ffmpeg.send(np.ascontiguousarray(u8))
        elif self.suffix == ".gif":
            self._write_gif(u8)
        else:
            from PIL import Image

            if self.count == 0:
                self._partial.mkdir()
                (self._partial / FRAMES_MARK).touch()
            Image.fromarray(u8).save(self._partial / f"{self.count:05d}.png")
        self.count += 1

    def _write_gif(self, u8: np.ndarray) -> None:
        from PIL import GifImagePlugin, Image

        frame = Image.fromarray(u8).convert("P", palette=Image.Palette.ADAPTIVE)
        delay = int(1000 / self.fps)  # ms; GIF stores centiseconds
        if self._gif is None:
            self._gif = open(self._partial, "wb")
            header, _ = GifImagePlugin.getheader(frame.copy(), info={"loop": 0, "duration": delay})
            self._gif.writelines(header)  # GIF89a, the first frame's palette as the global one, loop forever
        self._gif.writelines(GifImagePlugin.getdata(frame, duration=delay, include_color_table=True))

    def close(self, failed: bool = False) -> int:
        """Finish the file, in place of `path`, or `failed`: kept beside it (`kept`); returns the number of
        frames written."""
        if self._ffmpeg is not None:
            self._ffmpeg.close()
            self._ffmpeg = None
        if self._gif is not None:
            self._gif.write(b";")  # the GIF trailer
            self._gif.close()
            self._gif = None
        if self._partial.exists():
            target = self.path
            if failed:
                target = self.kept = self.path.with_name(f"{self.path.stem}.partial{self.suffix}")
                if not self.suffix and not _replaceable(target):  # someone's folder: the frames keep the hidden name
                    target = self.kept = self._partial
            if target != self._partial:
                _replace(self._partial, target)
        return self.count

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def _replaceable(folder: Path) -> bool:
    """Whether a VideoWriter may replace `folder`: it is not there, is empty, or holds a VideoWriter's frames and
    nothing else (a file someone put beside them would go with the folder)."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    names = [f.name for f in folder.iterdir()]
    return not names or (FRAMES_MARK in names and all(n == FRAMES_MARK or _FRAME_NAME.fullmatch(n) for n in names))


def check_frames_folder(path: Path) -> None:
    """An output folder of PNG frames replaces a folder only if it is empty or an earlier output (its mark)."""
    if path.exists() and not path.is_dir():
        raise VideoError(f"{path}: a file; PNG frames go to a folder (or name a .mp4 or .gif)")
    if not _replaceable(path):
        raise VideoError(f"{path}: a folder holding files mirage did not write; PNG frames go to a new or empty "
                         f"folder, or one of an earlier run (replaced whole)")


def _replace(new: Path, old: Path) -> None:
    """os.replace, also of a folder over a folder (the old one is moved aside, then removed)."""
    if not (new.is_dir() and old.is_dir()):
        os.replace(new, old)
        return
    aside = old.with_name(f".{old.name}.old-{os.getpid()}")
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)


def _encoder(path: Path, width: int, height: int, fps: int):
    """An mp4 encoder of RGB uint8 frames: send(frame), close()."""
    if _video_library() == "imageio_ffmpeg":
        import imageio_ffmpeg

        encoder = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, macro_block_size=1, quality=8)
        encoder.send(None)
        return encoder
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write mp4 here")

    class OpenCvEncoder:
        def send(self, frame: np.ndarray) -> None:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))

        def close(self) -> None:
            writer.release()

    return OpenCvEncoder()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 16, scale: int | None = None) -> int:
    """Write all `frames` with a VideoWriter; returns the number written."""
    with VideoWriter(path, fps, scale) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.count


def v2v_input(frame: np.ndarray, chroma_factor: int = 4) -> np.ndarray:
    """The video-to-video input of an (H, W, 3) frame in [-1, 1]: (Y, Cb, Cr) channels, luma at
    full resolution, chroma averaged over chroma_factor x chroma_factor blocks (numpy twin of
    mirage.train.data.v2v_input, which training runs on torch tensors; a test keeps them equal)."""
    ycc = np.ascontiguousarray(frame @ YCBCR.T, dtype=np.float32)  # (H, W, 3): Y, Cb, Cr
    for c in (1, 2):
        ycc[:, :, c] = _coarse(ycc[:, :, c], chroma_factor)
    return ycc


def _coarse(plane: np.ndarray, f: int) -> np.ndarray:
    """An (H, W) float32 plane averaged over f x f blocks and spread back. The block means are PIL's box
    filter and the spread back its nearest-neighbour resize: 5x faster than numpy's strided reductions at
    512x512 (2.2 vs 12 ms on one CPU core), which matters to mirage-serve, where every client frame of a
    restoring model goes through here."""
    from PIL import Image

    h, w = plane.shape
    small = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((w // f, h // f), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


def v2v_input_u8(frame: np.ndarray, chroma_factor: int = 4) -> np.ndarray:
    """v2v_input of a uint8 (or [-1, 1] float) frame as the bytes a pipeline with frames="uint8" takes: the
    rounding its staging would do (to_uint8), done by the caller, so that only bytes cross to the device.
    A uint8 frame is converted in byte units (to_uint8(v2v_input(to_float(frame))) with the scale folded in:
    YCBCR's luma row sums to 1 and its chroma rows to 0, so Y's bytes are round(Y) and a chroma byte is
    floor(C + 128)), without the float copies of the frame (1.8 vs 4.9 ms at 512x512 on one core); a value
    on a rounding edge may land one step away from that expression's."""
    if frame.dtype != np.uint8:
        return to_uint8(v2v_input(frame, chroma_factor))
    r, g, b = frame.transpose(2, 0, 1).astype(np.float32)  # (H, W) planes, each contiguous
    out = np.empty_like(frame)
    for c, offset in enumerate((0.5, 128.0, 128.0)):  # to_uint8's +0.5, and +127.5 more for signed chroma
        plane = r * YCBCR[c, 0] + g * YCBCR[c, 1] + b * YCBCR[c, 2]
        plane = _coarse(plane, chroma_factor) if c else plane
        out[:, :, c] = np.clip(plane + offset, 0, 255)  # the cast truncates: floor, as to_uint8's
    return out


def v2v_input_rgb(ycc: np.ndarray) -> np.ndarray:
    """An (H, W, 3) v2v_input back in RGB ([-1, 1]): the picture the model is given (full-resolution
    luma, colour in chroma_factor-pixel blocks), for showing beside its output."""
    return ycc @ np.linalg.inv(YCBCR).T.astype(np.float32)
