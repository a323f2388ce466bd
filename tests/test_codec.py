"""The server's image codec: GPU JPEG calls from many codec threads gathered into batches (runtime/codec.py,
here with a Pillow batch codec standing in for nvJPEG), a broken image failing its own call only, the
server's decode / encode going through it, and uint8 frames kept as bytes from the client to the pool."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import CKPT_V2V
from mirage.bridge.pipeline import load_pipeline
from mirage.core.config import PipelineOptions
from mirage.core.video_io import to_float, to_uint8
from mirage.runtime.codec import BatchedJpeg, gpu_jpeg
from mirage.runtime.pool import StreamPool
from mirage.runtime.server import HEADER, JPEG, Frame, ServeError, Server, ServerOptions, decode_frame, encode_frame

SIZE = 32


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


class PillowBatches:
    """A batch codec on Pillow that records its batches; `hold` makes the first batch wait until released."""

    name = "pillow"

    def __init__(self, hold: threading.Event | None = None):
        self.batches: list[tuple[str, int]] = []
        self.hold = hold

    def decode_batch(self, images):
        self.batches.append(("decode", len(images)))
        if self.hold is not None and len(self.batches) == 1:
            assert self.hold.wait(5)
        if any(not b.startswith(b"\xff\xd8") for b in images):
            raise RuntimeError("nvjpegDecodeBatched failed")  # as a batched GPU decode fails: all of it
        return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]


def rgb_frames(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for k in range(n)]


def held_batch(images: list[bytes]):
    """decode() of images[0] alone, then of the others from their own threads while the first batch is held:
    the codec's batches and every call's future."""
    hold = threading.Event()
    codec = PillowBatches(hold)
    batched = BatchedJpeg(codec.decode_batch)
    threads = ThreadPoolExecutor(len(images))
    futures = [threads.submit(batched.decode, images[0])]
    while not codec.batches:
        time.sleep(0.001)
    futures += [threads.submit(batched.decode, b) for b in images[1:]]
    while batched._queue.qsize() < len(images) - 1:
        time.sleep(0.001)
    hold.set()
    threads.shutdown(wait=True)
    batched.close()
    return codec.batches, futures


def test_calls_that_queue_while_a_batch_runs_go_together_in_the_next():
    images = [jpeg(f) for f in rgb_frames(6)]
    batches, futures = held_batch(images)
    assert batches == [("decode", 1), ("decode", 5)]
    for got, data in zip(futures, images):
        np.testing.assert_array_equal(got.result(), np.asarray(Image.open(io.BytesIO(data))))


def test_a_broken_image_fails_its_own_call_only():
    good = [jpeg(f) for f in rgb_frames(3)]
    batches, futures = held_batch([good[0], good[1], b"GIF89a broken", good[2]])
    assert all(futures[k].result().shape == (SIZE, SIZE, 3) for k in (0, 1, 3))
    with pytest.raises(RuntimeError, match="nvjpeg"):
        futures[2].result()
    assert batches[1:] == [("decode", 3), ("decode", 1), ("decode", 1), ("decode", 1)]  # together, then alone


def test_the_server_decodes_through_the_batched_codec_and_encodes_by_itself():
    codec = PillowBatches()
    batched = BatchedJpeg(codec.decode_batch)
    rgb = rgb_frames(1)[0]
    message = HEADER.pack(7, JPEG, 1.5) + jpeg(rgb)
    on_gpu = decode_frame(message, (SIZE, SIZE, 3), True, 1 << 20, 0.0, batched)
    alone = decode_frame(message, (SIZE, SIZE, 3), True, 1 << 20, 0.0)
    assert on_gpu.pixels.dtype == np.uint8 and np.array_equal(on_gpu.pixels, alone.pixels)
    reply = encode_frame(Frame(7, JPEG, 1.5, 0.0, None), rgb)
    assert reply[:HEADER.size] == HEADER.pack(7, JPEG, 1.5) and reply[HEADER.size:].startswith(b"\xff\xd8")
    assert codec.batches == [("decode", 1)]  # replies are Pillow's (model/nvjpeg.py says why)
    with pytest.raises(ServeError, match="frame 7: not a readable JPEG"):  # the header is checked before the codec
        decode_frame(HEADER.pack(7, JPEG, 1.5) + b"\xff\xd8" + bytes(40), (SIZE, SIZE, 3), True, 1 << 20, 0.0,
                     batched)
    assert len(codec.batches) == 1
    wrong = BatchedJpeg(lambda images: [np.zeros((SIZE, SIZE // 2, 3), np.uint8)])
    with pytest.raises(ServeError, match="header size mismatch"):
        decode_frame(message, (SIZE, SIZE, 3), True, 1 << 20, 0.0, wrong)
    for b in (batched, wrong):
        b.close()


def test_only_a_gpu_pool_with_a_jpeg_codec_gets_one():
    # video_to_video and the block contract (frames_in, controls, video_rate, restores): what a Server reads
    gpu = SimpleNamespace(jpeg=lambda: PillowBatches())
    fake = SimpleNamespace(video_to_video=True, frames_in=1, controls={}, video_rate=None, restores=True,
                           pipeline=SimpleNamespace(execution=SimpleNamespace(gpu=gpu)))
    batched = gpu_jpeg(fake)
    assert isinstance(batched, BatchedJpeg) and batched.name == "pillow"
    assert gpu_jpeg(SimpleNamespace(pools=[fake])) is not None  # a PoolGroup: its first pool's
    batched.close()
    served = Server(fake, ServerOptions())
    assert served.jpeg.name == "pillow"
    served.jpeg.close()
    assert Server(fake, ServerOptions(gpu_jpeg=False)).jpeg is None  # mirage-serve --cpu-jpeg
    with StreamPool.open(CKPT_V2V, slots=1, device="cpu", load=load_pipeline) as pool:
        assert gpu_jpeg(pool) is None  # CPU: Pillow in the codec threads
    assert gpu_jpeg(SimpleNamespace()) is None  # a stand-in pool without a pipeline


@pytest.mark.parametrize("frames", ["uint8", "float32"])
def test_a_pool_takes_bytes_or_floats_whichever_its_frames_cross_as(frames):
    """The server hands the pool uint8 inputs; a uint8 pool keeps them as bytes, a float pool converts them
    (before, a float pool's array took bytes as floats 0..255). Either input kind gives the same frames."""
    inputs = [to_uint8(to_float(f)) for f in rgb_frames(2)]
    outs = []
    for given in (inputs, [to_float(x) for x in inputs]):
        with StreamPool.open(CKPT_V2V, slots=1, device="cpu", load=load_pipeline,
                             options=PipelineOptions(frames=frames, steps=2)) as pool:
            slot = pool.attach(seed=3)
            outs.append([pool.step({slot: x})[slot] for x in given])
            assert pool._inputs.dtype == (np.uint8 if frames == "uint8" else np.float32)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
