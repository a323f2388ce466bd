"""The GPU plumbing the pipeline needs (buffers, pinned staging, streams, events, graphs) for engines
(TensorRT) that run on raw device pointers: `CudaGpu`, through cuda-python (runtime.cuda), torch-free;
the loop's element-wise work is NVRTC kernels (cuda.CudaOps). The PyTorch backend brings its own with
the same interface (model/torch_device.py: TorchGpu), handed in by the torch side.

Both enqueue the frame on one compute stream and copies on a second (copy) stream; whatever
writes the frame's buffers between frames (a row reset) goes on the compute stream too, inside
`on_compute()`, so it is ordered with the frames without a host wait.
"""
from __future__ import annotations

import contextlib

import numpy as np


class CudaGpu:
    def __init__(self, device: str):
        from mirage.runtime.cuda import CudaOps, Device

        index = int(device.split(":")[1]) if ":" in device else 0
        self.dev = Device(index)
        self.device = f"cuda:{index}"
        self.compute, self.copy_stream = self.dev.stream(), self.dev.stream()
        self.ops = CudaOps(self.dev, self.compute)

    def zeros(self, shape, dtype: str):
        buf = self.dev.empty(shape, dtype)
        self.ops.zero_(buf)
        return buf

    @contextlib.contextmanager
    def on_compute(self):
        """Make the device current for the calling thread: CudaOps' kernels are driver-API launches,
        which need a current context, and the server's step thread may have made no CUDA call
        before its first attach (Device.make_current). The stream needs no switch: CudaOps, copy
        and a graph's replay name the compute stream in every call."""
        self.dev.make_current()
        yield

    def pinned(self, like) -> np.ndarray:
        """Host staging in like's dtype: a raw async copy does not convert."""
        return self.dev.pinned(like.shape, like.dtype)

    def event(self):
        return self.dev.event()

    def synchronize(self) -> None:
        self.dev.synchronize()

    def upload(self, dst, host: np.ndarray) -> None:
        self.dev.upload(dst, host, self.copy_stream)

    def download(self, host: np.ndarray, src) -> None:
        self.dev.download(host, src, self.copy_stream)

    def copy(self, dst, src) -> None:
        self.dev.copy(dst, src, self.compute)

    def warm_up(self, body, for_capture: bool) -> None:
        body()
        self.synchronize()

    def capture(self, body):
        return self.dev.capture(self.compute, body)  # replays on the compute stream

    def device_name(self) -> str:
        from mirage.runtime.cuda import call

        props = call(self.dev.rt.cudaGetDeviceProperties, self.dev.index)
        return props.name.split(b"\0", 1)[0].decode()

    def memory_mb(self) -> tuple[float, str]:
        from mirage.runtime.cuda import call

        free, total = call(self.dev.rt.cudaMemGetInfo)
        return (total - free) / 2**20, "in use on the device (cudaMemGetInfo)"

    def close(self) -> None:
        self.ops.close()
        self.dev.close()
