"""The runtime's array plumbing on PyTorch, for the PyTorch backend (model/torch_backend.py), whose
ops only torch runs and only a torch CUDA graph captures. The runtime itself imports no torch: the
torch side hands these to runtime.Pipeline (mirage.bridge.pipeline), beside runtime.execution's
NumpyCpu (ONNX Runtime) and runtime.gpu's CudaGpu (engines on raw device pointers), with the same
interface.

- `TorchCpu`: CPU tensors for CpuExecution;
- `TorchGpu`: buffers, pinned staging, streams, events and graphs for GpuExecution; and the server's
  batched GPU JPEG codec (`jpeg`: model/nvjpeg.py).
"""
from __future__ import annotations

import numpy as np
import torch

from mirage.model.torch_ops import TorchOps


class TorchCpu:
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.ops = TorchOps(self.device)

    def zeros(self, shape, dtype: str):
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)

    def from_host(self, array: np.ndarray):
        return torch.from_numpy(array)

    def to_host(self, buf) -> np.ndarray:
        """A numpy view of a CPU tensor; bfloat16, which numpy lacks, as a float32 copy."""
        return (buf.float() if buf.dtype == torch.bfloat16 else buf).numpy()


class TorchGpu:
    def __init__(self, device: str):
        self.torch, self.device = torch, torch.device(device)
        self.compute = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.ops = TorchOps(self.device)
        self._pinned: dict[int, object] = {}  # numpy view address -> its pinned tensor
        self._pool = None

    def zeros(self, shape, dtype: str):
        return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)

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
        return graph  # replay() enqueues on the current stream: the caller is inside on_compute()

    def jpeg(self):
        """The server's batched JPEG codec on this GPU (model/nvjpeg.py: torchvision's nvJPEG ops), or None
        without torchvision (the server then decodes and encodes in CPU threads)."""
        try:
            from mirage.model.nvjpeg import NvJpeg

            return NvJpeg(self.device)
        except ImportError:
            return None

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.device)

    def memory_mb(self) -> tuple[float, str]:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**20, "peak allocated by PyTorch"

    def close(self) -> None:
        self.synchronize()
        self._pinned.clear()
