"""The server's JPEG decode on a GPU, batched: the calls of many streams' codec threads are gathered into
one batch for a batch decoder (nvJPEG through torchvision on the PyTorch backend's GPU), so that at 512x512
and above the decoding leaves the CPU threads and runs as one call per batch. (Replies are encoded by Pillow
in the codec threads: model/nvjpeg.py says why not on the GPU.)

    jpeg = gpu_jpeg(pool)             # None: no GPU codec for this pool (CPU, an engine's raw pointers, no torchvision)
    rgb = jpeg.decode(data)           # in a codec thread: waits for its batch; (H, W, 3) uint8

The runtime imports no torch: the batch codec comes from the torch side's GPU plumbing
(model/torch_device.py: TorchGpu.jpeg), as the plumbing itself does. Frames stay uint8 on the host both
ways; what the server does around a decode (header checks, the model's input) is the same with or
without this codec.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable

import numpy as np

MAX_BATCH = 32  # images per batch call: a pool's slots, and what nvJPEG's batched calls handle well


class BatchedJpeg:
    """decode calls from any thread, run in batches by one worker thread: a batch is what has queued up while
    the last one ran (nothing waits to fill it). `decode_batch(list[bytes]) -> list[(H, W, 3) uint8]` does the
    work; a batch that fails is retried image by image, so a broken image fails its own call only."""

    def __init__(self, decode_batch: Callable, name: str = "nvjpeg"):
        self.name = name
        self._decode_batch = decode_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=f"mirage-{name}", daemon=True)
        self._thread.start()

    def decode(self, data: bytes) -> np.ndarray:
        done: Future = Future()
        self._queue.put((data, done))
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            calls = [first]
            while len(calls) < MAX_BATCH:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._queue.put(None)  # close after this batch
                    break
                calls.append(call)
            self._run(calls)

    def _run(self, calls: list) -> None:
        try:
            results = self._decode_batch([data for data, _ in calls])
        except Exception as e:  # noqa: BLE001 (one broken image fails a batch: retry alone, answer the others)
            if len(calls) == 1:
                calls[0][1].set_exception(e)
            else:
                for call in calls:
                    self._run([call])
            return
        for (_, done), result in zip(calls, results):
            done.set_result(result)


def gpu_jpeg(pool) -> BatchedJpeg | None:
    """The batched GPU JPEG codec of `pool`'s device (the first pool's, for a group), or None: a CPU pool,
    one on an engine's raw pointers, or a GPU without torchvision's nvJPEG ops."""
    first = pool.pools[0] if hasattr(pool, "pools") else pool  # a PoolGroup's pools share one model
    execution = getattr(getattr(first, "pipeline", None), "execution", None)
    make = getattr(getattr(execution, "gpu", None), "jpeg", None)  # CpuExecution has no gpu, CudaGpu no jpeg
    codec = make() if make is not None else None
    return None if codec is None else BatchedJpeg(codec.decode_batch, codec.name)
