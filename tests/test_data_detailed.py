"""Camera-like synthetic video (DetailedVideo), photo pans (PhotoPans) and the shared camera view."""
from __future__ import annotations

import numpy as np
import pytest

from mirage.train.data import DetailedVideo, PhotoPans, SyntheticVideo, camera_view, make_source


def shift_between(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Integer translation (dy, dx) with b ~ roll(a, (dy, dx)), by phase correlation on luma."""
    fa, fb = np.fft.fft2(a.mean(-1)), np.fft.fft2(b.mean(-1))
    cross = fb * np.conj(fa)
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    return (dy - h if dy > h // 2 else dy), (dx - w if dx > w // 2 else dx)


@pytest.mark.parametrize("size", [32, 256, 512])
def test_detailed_format_at_every_size(size):
    clip = DetailedVideo(size, seed=0).clip(3, 2)
    assert clip.shape == (2, size, size, 3) and clip.dtype == np.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert clip.std() > 0.1  # not blank
    assert np.abs(np.diff(clip, axis=0)).mean() > 1e-3  # moves


def test_detailed_is_deterministic_and_continuous():
    a = DetailedVideo(64, seed=3).clip(4, 6, start=2)
    assert np.array_equal(a, DetailedVideo(64, seed=3).clip(4, 6, start=2))
    assert not np.array_equal(a, DetailedVideo(64, seed=3).clip(5, 6, start=2))  # other index
    assert not np.array_equal(a, DetailedVideo(64, seed=4).clip(4, 6, start=2))  # other seed
    assert np.allclose(a[:4], DetailedVideo(64, seed=3).clip(4, 8)[2:6], atol=1e-6)  # same video at later times


def test_detailed_has_pixel_scale_detail():
    # fine texture: neighbouring pixels differ several times more than in the smooth SyntheticVideo
    # (measured at 256x256, seed 1, clips 0-3: 0.044 against 0.0054 on average)
    def gradient(source):
        return np.mean([np.abs(np.diff(source.clip(i, 1)[0], axis=1)).mean() for i in range(4)])

    assert gradient(DetailedVideo(256, seed=1)) > 4 * gradient(SyntheticVideo(256, seed=1))


@pytest.mark.parametrize("source", [lambda: DetailedVideo(128, seed=2), lambda: PhotoPans(128, seed=2)])
def test_camera_pans(source):
    # the whole view translates: over 12 frames, frame 0 shifted by the measured (dy, dx) explains frame 12
    # better than frame 0 itself does
    src = source()
    moved = 0
    for index in range(4):
        clip = src.clip(index, 13)
        dy, dx = shift_between(clip[0], clip[12])
        if (dy, dx) == (0, 0):
            continue
        moved += 1
        m = 16 + max(abs(dy), abs(dx))  # compare away from the borders the roll wraps
        rolled = np.roll(clip[0], (dy, dx), axis=(0, 1))
        err_shifted = np.abs(rolled[m:-m, m:-m] - clip[12][m:-m, m:-m]).mean()
        err_still = np.abs(clip[0][m:-m, m:-m] - clip[12][m:-m, m:-m]).mean()
        assert err_shifted < err_still
    assert moved >= 3


def test_photo_pans():
    a = PhotoPans(64, seed=0).clip(1, 3)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.float32 and -1 <= a.min() and a.max() <= 1
    assert np.array_equal(a, PhotoPans(64, seed=0).clip(1, 3))
    assert not np.array_equal(a, PhotoPans(64, seed=1).clip(1, 3))
    assert PhotoPans(512, seed=0).clip(0, 1).shape == (1, 512, 512, 3)


def test_camera_view_is_bilinear_resampling():
    img = np.random.default_rng(0).random((20, 30, 2)).astype(np.float32)
    one = np.ones(1, np.float32)
    # a 1:1 window at an integer offset is a crop
    assert np.allclose(camera_view(img, one * 3, one * 5, one * 10, 10)[0], img[3:13, 5:15], atol=1e-6)
    # a half-pixel offset averages neighbours
    half = camera_view(img, one * 3.5, one * 5, one * 10, 10)[0]
    assert np.allclose(half, (img[3:13, 5:15] + img[4:14, 5:15]) / 2, atol=1e-6)


def test_make_source_names():
    assert isinstance(make_source("detailed", 32, 4), DetailedVideo)
    assert isinstance(make_source("photos", 32, 4), PhotoPans)


@pytest.mark.parametrize("size", [32, 256])
def test_video_folder_at_any_size(tmp_path, size):
    from PIL import Image

    from mirage.train.data import VideoFolder

    seq = tmp_path / "clip"
    seq.mkdir()
    for i in range(3):
        Image.fromarray(np.full((90, 120, 3), 40 * i, np.uint8)).save(seq / f"{i:03d}.png")
    clip = VideoFolder(tmp_path, size, min_frames=2).clip(0, 2)
    assert clip.shape == (2, size, size, 3) and clip.dtype == np.float32
