"""Synthetic video, the video-to-video input, video folders and frame I/O."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from mirage.core.video_io import VideoError, input_size, iter_frames, write_video
from mirage.train.data import YCBCR, ClipStream, DataError, SyntheticVideo, VideoFolder, make_source, v2v_input

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---- synthetic video -----------------------------------------------------------------------


def test_synthetic_is_deterministic():
    a = SyntheticVideo(32, seed=3).clip(4, 6, start=2)
    b = SyntheticVideo(32, seed=3).clip(4, 6, start=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, SyntheticVideo(32, seed=3).clip(5, 6, start=2))  # other index
    assert not np.array_equal(a, SyntheticVideo(32, seed=4).clip(4, 6, start=2))  # other seed


def test_synthetic_format():
    clip = SyntheticVideo(32, seed=0).clip(0, 5)
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert clip.std() > 0.05  # not a blank frame
    assert np.abs(np.diff(clip, axis=0)).mean() > 1e-3  # things move
    assert SyntheticVideo(64, seed=0).clip(0, 2).shape == (2, 64, 64, 3)


def test_a_wide_synthetic_video_is_the_square_one_widened():
    """(height, width) frames: shapes keep their size in pixels of the shorter side and travel the whole
    width (a square clip's shapes stay in its square), so a wide clip is not a stretched square one."""
    wide = SyntheticVideo((64, 160), seed=2).clip(0, 40)
    assert wide.shape == (40, 64, 160, 3)
    background = np.abs(np.diff(wide[0], axis=1)).max(axis=(0, 2)) < 0.05  # per column pair: only the gradient
    moving = np.abs(np.diff(wide, axis=0)).max(axis=(0, 1, 3)) > 0.2  # columns a shape passed through
    assert moving[:64].any() and moving[96:].any() and not background.all()


def test_synthetic_time_continuity():
    sv = SyntheticVideo(32, seed=1)
    late, early = sv.clip(9, 10, start=5), sv.clip(9, 10, start=0)
    assert np.allclose(late[0], early[5], atol=1e-6)
    assert np.allclose(late[:5], early[5:], atol=1e-6)


def test_synthetic_shapes_painted_in_their_boxes_are_the_whole_frame_render(monkeypatch):
    """clip() paints each shape inside its box only (7x faster at 512x512); painting every pixel must give
    the same frames: a box too small cuts a shape's edge, its ramp or a corner of a rotated square."""
    from mirage.core import synthetic

    sizes = (128, (96, 160), (160, 96))  # square, wide and tall: a box in the longer axis's units too
    boxed = [SyntheticVideo(size, seed=seed).clip(index, 2, start=5 * index)
             for size in sizes for seed in range(3) for index in range(3)]
    monkeypatch.setattr(synthetic, "_box", lambda center, reach, unit, size: slice(0, size))
    whole = [SyntheticVideo(size, seed=seed).clip(index, 2, start=5 * index)
             for size in sizes for seed in range(3) for index in range(3)]
    assert max(np.abs(a - b).max() for a, b in zip(boxed, whole)) < 1e-6


# ---- the video-to-video input ----------------------------------------------------------------


def test_v2v_input_luma_channel_is_exact():
    clip = torch.from_numpy(SyntheticVideo(32, seed=2).clip(0, 3)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = v2v_input(clip)
    assert x.shape == clip.shape and x.dtype == clip.dtype
    luma = torch.einsum("tchw,c->thw", clip, torch.from_numpy(LUMA))
    assert torch.allclose(x[:, 0], luma, atol=1e-6)


def test_v2v_input_chroma_is_block_average():
    clip = torch.from_numpy(SyntheticVideo(32, seed=2).clip(1, 2)).permute(0, 3, 1, 2)
    x = v2v_input(clip, chroma_factor=4)
    cb = torch.einsum("tchw,c->thw", clip, torch.from_numpy(YCBCR[1]))
    block = cb[:, 8:12, 12:16].mean(dim=(1, 2))  # one 4x4 block
    assert torch.allclose(x[:, 1, 8:12, 12:16], block[:, None, None].expand(-1, 4, 4), atol=1e-6)
    # piecewise constant over 4x4 blocks
    assert torch.equal(x[:, 1:, ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), x[:, 1:])


@pytest.mark.parametrize("shape", [(32, 32), (48, 64)])
def test_v2v_input_numpy_twin_equals_torch(shape):
    """mirage.core.video_io.v2v_input (numpy + PIL: mirage-run, mirage-serve) = the training one."""
    from mirage.core.video_io import v2v_input as v2v_numpy

    frame = np.random.default_rng(0).uniform(-1, 1, (*shape, 3)).astype(np.float32)
    expected = v2v_input(torch.from_numpy(frame).permute(2, 0, 1)).permute(1, 2, 0).numpy()  # (H, W, 3)
    got = v2v_numpy(frame)
    assert got.dtype == np.float32 and got.shape == frame.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (30, 22)])  # 30x22: PIL's box over uneven blocks
def test_v2v_input_u8_of_bytes_is_the_float_path_in_byte_units(shape):
    """v2v_input_u8 of a uint8 frame (mirage-serve's restore, in byte units) = the bytes of the float path
    (to_uint8 of v2v_input of to_float) but for values on a rounding edge, one step away and rare."""
    from mirage.core.video_io import to_float, to_uint8, v2v_input_u8
    from mirage.core.video_io import v2v_input as v2v_numpy

    frame = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    frame[:8, :8] = (255, 0, 255)  # extreme chroma, clipped the same way by both
    expected = to_uint8(v2v_numpy(to_float(frame)))
    got = v2v_input_u8(frame)
    assert got.dtype == np.uint8 and got.shape == frame.shape
    off = np.abs(got.astype(np.int16) - expected)
    assert off.max() <= 1 and (off > 0).mean() < 1e-3
    np.testing.assert_array_equal(v2v_input_u8(to_float(frame)), expected)  # a float frame: the float path


def test_v2v_input_of_gray_is_luma_and_no_chroma():
    # A gray frame (R = G = B) goes in as itself with zero chroma: exactly the classic grayscale input.
    g = torch.rand(2, 1, 16, 16) * 2 - 1
    x = v2v_input(g.expand(2, 3, 16, 16))
    assert torch.allclose(x[:, 0], g[:, 0], atol=1e-6)
    assert x[:, 1:].abs().max().item() < 1e-6


def test_v2v_input_full_resolution_is_invertible():
    # chroma_factor=1 keeps all color: the RGB ground truth is recoverable from the input.
    clip = torch.from_numpy(SyntheticVideo(32, seed=5).clip(0, 2)).permute(0, 3, 1, 2)
    x = v2v_input(clip, chroma_factor=1)
    rgb = torch.einsum("cd,tdhw->tchw", torch.linalg.inv(torch.from_numpy(YCBCR)), x)
    assert torch.allclose(rgb, clip, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 8, 8), (2, 4, 3, 8, 8)])
def test_v2v_input_keeps_leading_dims(shape):
    x = torch.rand(shape) * 2 - 1
    y = v2v_input(x)
    assert y.shape == x.shape
    flat = v2v_input(x.reshape(-1, 3, 8, 8)).reshape(shape)
    assert torch.equal(y, flat)


# ---- video folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    clip = SyntheticVideo(32, seed=11).clip(0, 12)
    assert write_video(root / "a.mp4", clip, scale=1) == 12
    assert write_video(root / "seq", clip[:6], scale=1) == 6  # a folder of PNGs
    return root, clip


def test_video_folder_loads_videos_and_sequences(video_root):
    root, clip = video_root
    src = VideoFolder(root, 32, min_frames=5)
    assert [len(v) for v in src.videos] == [12, 6]  # a.mp4, then seq/
    c = src.clip(1, 5)
    assert c.shape == (5, 32, 32, 3) and c.dtype == np.float32
    assert np.abs(c - clip[:5]).max() <= 1 / 127.5 + 1e-6  # PNG: only 8-bit quantisation
    assert np.array_equal(src.clip(3, 5, start=7), src.videos[1][1:6])  # index wraps, start wraps
    assert src.clip(0, 5, start=7).shape == (5, 32, 32, 3)


def test_mp4_round_trip(video_root):
    root, clip = video_root
    back = np.stack(list(iter_frames(root / "a.mp4", 32)))
    assert back.shape == clip.shape
    assert np.abs(back - clip).mean() < 0.1  # lossy H.264 + 4:2:0 chroma, but the same video


def test_mp4_round_trip_through_opencv_without_imageio_ffmpeg(tmp_path, monkeypatch):
    """mirage installed without its dependencies beside an OpenCV (the GPU machine's image): mp4s are written
    and read through cv2; with neither library, one clear line."""
    pytest.importorskip("cv2")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    clip = SyntheticVideo(32, seed=11).clip(0, 12)
    assert write_video(tmp_path / "a.mp4", clip, scale=1) == 12
    assert input_size(tmp_path / "a.mp4") == (32, 32)
    back = np.stack(list(iter_frames(tmp_path / "a.mp4", 32)))
    assert back.shape == clip.shape and np.abs(back - clip).mean() < 0.1  # lossy MPEG-4 part 2, the same video
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(VideoError, match="imageio-ffmpeg .* or OpenCV"):
        list(iter_frames(tmp_path / "a.mp4", 32))


def test_gif_keeps_identical_frames_with_their_pixels_and_delays(tmp_path):
    """Pillow's GIF save merged a frame identical to the one before it into that frame (adding the
    delays), so a still stretch came back short (the flaky frame count of test_dit_run)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (40, 3), dtype=np.uint8)  # <= 256 colours: GIF's palette keeps them exactly
    still, other = (colours[rng.integers(0, 40, (24, 40))] for _ in range(2))
    frames = [still] * 5 + [other, other, still]
    assert write_video(tmp_path / "v.gif", frames, fps=16, scale=1) == 8
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 8 and gif.info["loop"] == 0
        back = [(np.asarray(f.convert("RGB")), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
    for (pixels, delay), frame in zip(back, frames):
        assert np.array_equal(pixels, frame) and delay == 60  # 1000 / 16 ms, in GIF's centiseconds
    for name in ("v.gif", "v.mp4", "seq"):  # ffmpeg's reader counts them too, and as many in every format
        if name != "v.gif":
            write_video(tmp_path / name, frames, fps=16, scale=1)
        assert len(list(iter_frames(tmp_path / name, 24))) == 8, name


def test_iter_frames_resizes(video_root):
    root, _ = video_root
    frames = list(iter_frames(root / "seq", 16))
    assert len(frames) == 6 and frames[0].shape == (16, 16, 3)


@pytest.mark.parametrize("h, w, shape, window", [
    (480, 832, (128, 192), (0, 56, 480, 720)),    # wider than the model: the sides cut
    (480, 832, (480, 832), (0, 0, 480, 832)),     # the model's own shape: whole
    (720, 720, (128, 192), (120, 0, 480, 720)),   # a square input for a wide model: top and bottom cut
    (480, 832, (64, 64), (0, 176, 480, 480)),     # a square model: the center square, as before
    (100, 50, (32, 32), (25, 0, 50, 50)),
])
def test_frames_are_scaled_to_cover_the_model_and_center_cropped(h, w, shape, window):
    from mirage.core.video_io import center_crop, fit_frame

    assert center_crop(h, w, shape) == window
    frame = np.zeros((h, w, 3), np.uint8)
    top, left, ch, cw = window
    frame[top:top + ch, left:left + cw] = 200  # the window white, what is cut black
    fitted = fit_frame(frame, shape)
    assert fitted.shape == (*shape, 3) and fitted.min() >= 190  # nothing cut off shows


def test_iter_frames_reads_a_video_at_the_models_height_and_width(tmp_path):
    """A 96x64 (WxH) clip read for a 48x32 model: scaled down whole; read for a square 32: its center square."""
    clip = np.zeros((3, 64, 96, 3), np.uint8)
    clip[:, :, :16] = 255  # a white band at the left edge
    write_video(tmp_path / "wide", clip, scale=1)  # PNG frames: lossless
    wide = np.stack(list(iter_frames(tmp_path / "wide", (32, 48))))
    assert wide.shape == (3, 32, 48, 3) and wide[:, :, :6].min() > 0.9 and wide[:, :, 10:].max() < -0.9
    square = np.stack(list(iter_frames(tmp_path / "wide", 32)))
    assert square.shape == (3, 32, 32, 3) and square.max() < -0.9  # the band is outside the center square


def test_make_source(video_root):
    """A name gives that source at the asked size with the asked seed; a folder gives its videos."""
    root, _ = video_root
    synthetic = make_source("synthetic", 24, 5, seed=3).clip(2, 5)
    assert np.array_equal(synthetic, SyntheticVideo(24, seed=3).clip(2, 5))
    assert not np.array_equal(synthetic, make_source("synthetic", 24, 5, seed=4).clip(2, 5))
    for name in ("synthetic", "detailed"):  # frames in range, of the size asked, with motion between them
        clip = make_source(name, 24, 4, seed=0).clip(0, 4)
        assert clip.shape == (4, 24, 24, 3) and clip.dtype == np.float32 and -1 <= clip.min() < clip.max() <= 1
        assert np.abs(np.diff(clip, axis=0)).mean() > 1e-3, name
    folder = make_source(str(root), 16, 5).clip(0, 5)
    assert np.array_equal(folder, np.stack(list(iter_frames(root / "a.mp4", 16))[:5]))
    with pytest.raises(DataError, match="not a folder"):
        make_source(str(root / "nowhere"), 16, 5)


def test_clip_stream_is_seeded():
    src = SyntheticVideo(16, seed=0)
    a, b = iter(ClipStream(src, 3, seed=1)), iter(ClipStream(src, 3, seed=1))
    x, y = next(a), next(b)
    assert x.shape == (3, 3, 16, 16) and torch.equal(x, y)
    assert not torch.equal(next(iter(ClipStream(src, 3, seed=2))), x)


def test_video_folder_missing_path(tmp_path):
    with pytest.raises(DataError, match="not a folder") as e:
        VideoFolder(tmp_path / "nowhere", 32, 5)
    assert str(tmp_path / "nowhere") in str(e.value)


def test_video_folder_empty(tmp_path):
    with pytest.raises(DataError, match="no videos") as e:
        VideoFolder(tmp_path, 32, 5)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(DataError, match="no videos"):
        VideoFolder(tmp_path, 32, 5)


def test_video_folder_broken_file(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00garbage, not an mp4 at all\xff" * 20)
    with pytest.raises(DataError) as e:
        VideoFolder(tmp_path, 32, 5)
    assert "broken.mp4" in str(e.value)


def test_video_folder_too_short(tmp_path):
    write_video(tmp_path / "short", SyntheticVideo(32).clip(0, 3), scale=1)
    with pytest.raises(DataError, match="3 frames") as e:
        VideoFolder(tmp_path, 32, min_frames=5)
    assert "short" in str(e.value)


def test_iter_frames_errors(tmp_path):
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(VideoError, match="not a video") as e:
        list(iter_frames(tmp_path / "clip.txt", 32))
    assert "clip.txt" in str(e.value)
    with pytest.raises(VideoError, match="no such file"):
        list(iter_frames(tmp_path / "missing.mp4", 32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no images"):
        list(iter_frames(tmp_path / "empty", 32))


def test_missing_webcam_is_a_clear_error():
    from mirage.core.video_io import VideoError, iter_frames

    with pytest.raises(VideoError, match="/dev/video97: no such webcam"):
        next(iter_frames("97", 32))
