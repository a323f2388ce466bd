"""The GPU plumbing the pipeline needs (buffers, pinned staging, streams, events, graphs) in two
implementations with one interface:

- `TorchGpu`: through PyTorch, for the PyTorch backend, whose ops only a torch CUDA graph captures;
- `CudaGpu`: through cuda-python (runtime.cuda), torch-free, for engines (TensorRT) that run on
  raw device pointers; the loop's element-wise work is NVRTC kernels (cuda.CudaOps).

Both enqueue the frame on one compute stream and copies on a second (copy) stream; whatever
writes the frame's buffers between frames (a row reset) goes on the compute stream too, inside
`on_compute()`, so it is ordered with the frames without a host wait.
"""
from __future__ import annotations

import contextlib

import numpy as np


class TorchGpu:
    array = "torch"

    def __init__(self, device: str):
        import torch

        from mirage.model.torch_ops import TorchOps

        self.torch, self.device = torch, torch.device(device)
        self.compute = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.ops = TorchOps(self.device)
        self._pinned: dict[int, object] = {}  # numpy view address -> its pinned tensor
        self._pool = None

    def zeros(self, shape, dtype: str):
        return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def fill(self, buf, value: float) -> None:
        buf.fill_(value)

    def on_compute(self):
        """Make the compute stream the calling thread's current one: torch ops (and a graph's replay)
        enqueue on the current stream, and the server's step thread is a worker whose current stream is
        the default one, not necessarily the stream that was current when the pipeline was built."""
        return self.torch.cuda.stream(self.compute)

    def pinned(self, like) -> np.ndarray:
        """Host staging for `like`: bytes for uint8, else float32 (the device copy converts to like's dtype)."""
        dtype = self.torch.uint8 if like.dtype == self.torch.uint8 else self.torch.float32
        t = self.torch.zeros(tuple(like.shape), dtype=dtype, pin_memory=True)
        view = t.numpy()
        self._pinned[view.ctypes.data] = t
        return view

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def sync_event(self, event) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def upload(self, dst, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self.copy_stream):
            dst.copy_(self._pinned[host.ctypes.data], non_blocking=True)

    def download(self, host: np.ndarray, src) -> None:
        with self.torch.cuda.stream(self.copy_stream):
            self._pinned[host.ctypes.data].copy_(src, non_blocking=True)

    def copy(self, dst, src) -> None:
        dst.copy_(src)

    def warm_up(self, body, for_capture: bool) -> None:
        """Run `body` eagerly once. Capture wants the warm-up on a side stream (PyTorch's rule);
        a compiled backend with its own CUDA graphs is warmed where it will run."""
        torch = self.torch
        side = torch.cuda.Stream(self.device) if for_capture else self.compute
        side.wait_stream(self.compute)
        with torch.cuda.stream(side):
            body()
        self.compute.wait_stream(side)
        self.synchronize()

    def capture(self, body):
        torch = self.torch
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        return graph

    def replay(self, graph) -> None:
        graph.replay()  # on the current stream: the caller is inside on_compute()

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.device)

    def reset_peak_memory(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory_mb(self) -> tuple[float, str]:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**20, "peak allocated by PyTorch"

    def close(self) -> None:
        self.synchronize()
        self._pinned.clear()


class CudaGpu:
    array = "cuda"

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

    def fill(self, buf, value: float) -> None:
        self.ops.fill_(buf, value)

    @contextlib.contextmanager
    def on_compute(self):
        """Make the device current for the calling thread: CudaOps' kernels are driver-API launches,
        which need a current context, and the server's step thread may have made no CUDA call
        before its first attach (Device.make_current). The stream needs no switch: CudaOps, copy
        and replay name the compute stream in every call."""
        self.dev.make_current()
        yield

    def pinned(self, like) -> np.ndarray:
        """Host staging in like's dtype: a raw async copy does not convert."""
        return self.dev.pinned(like.shape, like.dtype)

    def event(self):
        return self.dev.event()

    def record(self, event, stream) -> None:
        self.dev.record(event, stream)

    def wait(self, stream, event) -> None:
        self.dev.wait(stream, event)

    def elapsed_ms(self, start, end) -> float:
        return self.dev.elapsed_ms(start, end)

    def sync_event(self, event) -> None:
        self.dev.sync_event(event)

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
        return self.dev.capture(self.compute, body)

    def replay(self, graph) -> None:
        graph.launch(self.compute)

    def device_name(self) -> str:
        from mirage.runtime.cuda import call

        props = call(self.dev.rt.cudaGetDeviceProperties, self.dev.index)
        return props.name.split(b"\0", 1)[0].decode()

    def reset_peak_memory(self) -> None:
        pass  # no allocator statistics outside PyTorch: memory_mb reports what is in use

    def memory_mb(self) -> tuple[float, str]:
        from mirage.runtime.cuda import call

        free, total = call(self.dev.rt.cudaMemGetInfo)
        return (total - free) / 2**20, "in use on the device (cudaMemGetInfo)"

    def close(self) -> None:
        self.ops.close()
        self.dev.close()
