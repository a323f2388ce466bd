"""The server's batched nvJPEG decoder (model/nvjpeg.py through runtime/codec.py) on the GPU: a batch of
512x512 JPEGs decodes to what Pillow (libjpeg) decodes, within the IDCT's rounding, idle and beside a
step-sized load on another stream; the server's decode_frame gives the same model input through it as
through Pillow; and a pool on the PyTorch backend's GPU hands the server this decoder."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision")

from mirage.bridge.pipeline import load_pipeline  # noqa: E402
from mirage.core.synthetic import SyntheticVideo  # noqa: E402
from mirage.core.video_io import to_uint8  # noqa: E402
from mirage.model.torch_device import TorchGpu  # noqa: E402
from mirage.runtime.codec import BatchedJpeg, gpu_jpeg  # noqa: E402
from mirage.runtime.pool import StreamPool  # noqa: E402
from mirage.runtime.server import HEADER, JPEG, ServeError, decode_frame  # noqa: E402

pytestmark = pytest.mark.gpu

CKPT_V2V = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-v2v"
SIZE = 512


def frames(n: int) -> list[np.ndarray]:
    return [to_uint8(f) for f in SyntheticVideo(SIZE, seed=5).clip(0, n)]


def pillow_jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def assert_decoded_as_pillow(decoded: list[np.ndarray], data: list[bytes]) -> None:
    for got, d in zip(decoded, data):
        want = pillow_rgb(d)
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want)
        # IDCT / chroma upsampling: nvJPEG and libjpeg round differently, most at a few sharp colour edges
        # (on an H100: mean 0.31-0.33, max 24-38 over two runs' images), so the bound is on all but 0.1%
        assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 16, (diff.mean(), np.percentile(diff, 99.9))


def test_a_batch_decodes_as_pillow_does():
    codec = TorchGpu("cuda").jpeg()
    assert codec is not None and codec.name == "nvjpeg"
    data = [pillow_jpeg(f) for f in frames(8)]
    assert_decoded_as_pillow(codec.decode_batch(data), data)


def test_a_batch_decoded_while_the_gpu_is_busy_is_whole():
    """The served case: batches decoded while a step's worth of work runs on another stream."""
    codec = TorchGpu("cuda").jpeg()
    data = [pillow_jpeg(f) for f in frames(8)]
    load_stream = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        with torch.cuda.stream(load_stream):
            for _ in range(30):  # ~25 ms of matmuls on an H100
                a @ a
        assert_decoded_as_pillow(codec.decode_batch(data), data)
    load_stream.synchronize()


def test_the_server_decodes_through_nvjpeg_from_many_threads():
    codec = TorchGpu("cuda").jpeg()
    batched = BatchedJpeg(codec.decode_batch, codec.name)
    messages = [HEADER.pack(n, JPEG, 0.0) + pillow_jpeg(f) for n, f in enumerate(frames(8))]
    decode = lambda m: decode_frame(m, (SIZE, SIZE, 3), True, 1 << 22, 0.0, batched)  # noqa: E731
    with ThreadPoolExecutor(8) as threads:  # as the server's codec threads call it
        on_gpu = list(threads.map(decode, messages))
    batched.close()
    for m, frame in zip(messages, on_gpu):
        cpu = decode_frame(m, (SIZE, SIZE, 3), True, 1 << 22, 0.0)
        assert frame.pixels.dtype == np.uint8 and np.abs(frame.pixels.astype(int) - cpu.pixels).mean() < 1.0


def test_a_gpu_pool_on_the_torch_backend_hands_the_server_its_codec():
    with StreamPool.open(CKPT_V2V, slots=2, device="cuda", load=load_pipeline) as pool:
        batched = gpu_jpeg(pool)
        assert isinstance(batched, BatchedJpeg) and batched.name == "nvjpeg"
        assert batched.decode(pillow_jpeg(np.full((64, 64, 3), 200, np.uint8))).shape == (64, 64, 3)
        batched.close()
    torch.cuda.synchronize()


def test_mutated_jpegs_through_nvjpeg_decode_or_raise_one_serve_error_and_leave_the_gpu_working():
    """A hostile client's cut and bit-flipped JPEGs (fixed seed) reach nvJPEG once their headers pass: each
    decodes or raises ServeError, and afterwards the GPU still decodes a good frame and runs a graph (a sticky
    CUDA error from the codec would end every stream of the server)."""
    codec = TorchGpu("cuda").jpeg()
    batched = BatchedJpeg(codec.decode_batch, codec.name)
    rng = np.random.default_rng(0)
    size = 64
    good = pillow_jpeg(frames(1)[0][:size, :size].copy())
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(2, len(data))] = rng.integers(256)
        data = data[:rng.integers(2, len(data) + 1)] if rng.random() < 0.5 else data
        try:
            decode_frame(HEADER.pack(1, JPEG, 0.0) + bytes(data), (size, size, 3), True, 1 << 20, 0.0, batched)
            outcomes["decoded"] += 1
        except ServeError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes  # and nothing else was raised
    frame = decode_frame(HEADER.pack(2, JPEG, 0.0) + good, (size, size, 3), True, 1 << 20, 0.0, batched)
    assert frame.pixels.shape == (size, size, 3)
    batched.close()
    x = torch.ones(4, device="cuda")
    assert float((x * 2).sum()) == 8.0
