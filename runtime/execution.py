"""How frames execute: eagerly on the CPU, or as captured CUDA graphs on a GPU. Two small classes
behind one interface, so the Pipeline has no "is there a GPU" branches.

    ex.alloc(shape, dtype)                           zeroed buffers where the backend computes
    ex.ops                                           the loop's Ops on them (fill_, to_uint8_, ...)
    ex.prepare(buf)                                  warm up and capture (GPU); nothing (CPU)
    ex.submit(cond, advance)                         start a unit (a frame, a block) for every row; cond None
                                                     or (B, H, W, C) host frames, float or uint8; advance
                                                     (B,) int64: 1 = the row commits the unit, 0 = held
    ex.collect() -> (B·n, H, W, C) float32 or uint8  the oldest submitted unit's n frames per row
    ex.pending                                       units submitted and not collected
    ex.reset_rows(rows, seeds)                       empty rows' memory and restart their noise: units
                                                     submitted before see the old rows, the next the new
                                                     (on a GPU stream-ordered, without a host wait)
    ex.between_units(body, writes)                   host arrays into buffers, then body() on the device,
                                                     with no unit in flight (a prompt change)

What a unit does is the family's (`unit`: core.loop.FrameUnit, core.dit_step.BlockUnit): its `run` is the
captured body, its `host_inputs` are staged with the unit like the input frames.

Layout and uint8 conversion live in one place per array library: on the host (numpy) in
`to_stage` / `from_stage` below, on the device in the loop's Ops (`to_uint8_`, `to_float_`: NumpyOps,
TorchOps, CudaOps). With frames "uint8" (PipelineOptions.frames) the frame's own ops convert (inside
the CUDA graph on a GPU): bytes in, bytes and a per-row finite flag out, so no float frame crosses
PCIe and a NaN frame still raises; with float frames the host converts, (B, H, W, C) <-> (B, C, H, W).
"""
from __future__ import annotations

import warnings

import numpy as np

from mirage.core.errors import MirageError
from mirage.core.loop import Buffers, NumpyOps
from mirage.core.video_io import as_uint8, to_float


TIMELINE_KEEP = 1000  # frames of GPU event times kept: a server steps for hours, its timeline must not grow


class NonFiniteError(MirageError):
    """A graph produced NaN or Inf: the run stops rather than write a black video."""


def to_stage(cond: np.ndarray, frames: str) -> np.ndarray:
    """Host input frames (B, H, W, C), float in [-1, 1] or uint8, as they are staged for the device:
    bytes as they are (uint8 frames: the frame's ops convert), else (B, C, H, W) float32."""
    if frames == "uint8":
        return np.ascontiguousarray(as_uint8(cond))
    floats = to_float(cond) if cond.dtype == np.uint8 else cond.astype(np.float32, copy=False)
    return np.ascontiguousarray(floats.transpose(0, 3, 1, 2))


def from_stage(frame: np.ndarray) -> np.ndarray:
    """A float frame (B, C, H, W) off the device, in its dtype, as the host takes it: (B, H, W, C)
    float32, a copy."""
    return frame.astype(np.float32).transpose(0, 2, 3, 1)


class NumpyCpu:
    """CpuExecution's arrays as numpy arrays (ONNX Runtime); the PyTorch backend's are CPU tensors
    (model/torch_device.py: TorchCpu, same interface)."""

    def __init__(self):
        self.ops = NumpyOps()

    def zeros(self, shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, buf: np.ndarray) -> np.ndarray:
        return buf


class CpuExecution:
    """The loop run eagerly, one frame at a time (ONNX Runtime on numpy, PyTorch on CPU tensors).
    `cpu` makes and reads the buffers: NumpyCpu by default, the torch side's TorchCpu for torch."""

    def __init__(self, backend, unit, frames: str, cpu=None):
        self.backend, self.unit, self.frames = backend, unit, frames
        self.graphs: list = []  # no CUDA graphs on the CPU
        self.timeline: list[dict] = []  # nor GPU events
        self.cpu = cpu or NumpyCpu()
        self.ops = self.cpu.ops
        self._result: np.ndarray | None = None

    def alloc(self, shape, dtype: str):
        return self.cpu.zeros(shape, dtype)

    def prepare(self, buf: Buffers) -> None:
        self.buf = buf
        if self.frames == "uint8":  # the bytes and finite flags the ops make, as on a GPU
            b, c, h, w = buf.frame.shape
            self.frame_u8, self.finite = self.alloc((b, h, w, c), "uint8"), self.alloc((b,), "uint8")

    @property
    def pending(self) -> int:
        return int(self._result is not None)

    def submit(self, cond: np.ndarray | None, advance: np.ndarray) -> None:
        u8, host = self.frames == "uint8", self.cpu.to_host
        if cond is not None:
            staged = self.cpu.from_host(to_stage(cond, self.frames))
            if u8:
                self.ops.to_float_(self.buf.input, staged)
            else:
                self.buf.input[...] = staged
        self.buf.advance[...] = self.cpu.from_host(advance)
        for name, array in self.unit.host_inputs(advance).items():
            self.buf.host[name][...] = self.cpu.from_host(array)
        self.unit.run(self.backend, self.ops, self.buf)
        if u8:
            self.ops.to_uint8_(self.frame_u8, self.finite, self.buf.frame)
            self._result, finite = host(self.frame_u8).copy(), host(self.finite).all()
        else:
            self._result = from_stage(host(self.buf.frame))
            finite = np.isfinite(self._result).all()
        frame_graph, (memory_graph, memory) = self.buf.made_by
        for graph, ok in ((frame_graph, finite), (memory_graph, np.isfinite(host(memory)).all())):
            if not ok:
                raise NonFiniteError(f"the {graph} graph produced non-finite values (NaN or Inf); the model or "
                                     "artifact is broken: re-export it, or check the checkpoint's weights")

    def collect(self) -> np.ndarray:
        result, self._result = self._result, None
        return result

    def reset_rows(self, rows, seeds) -> None:
        for row, seed in zip(rows, seeds):
            self.unit.reset_row(self.ops, self.buf, row, seed)

    def between_units(self, body, writes: list) -> None:
        """`writes` [(buffer, host array)] copied in, then body() (graphs run outside a unit)."""
        for buf, array in writes:
            buf[...] = self.cpu.from_host(np.ascontiguousarray(array))
        body()

    def describe(self) -> tuple[str, float | None, str]:
        return "cpu", None, ""

    def close(self) -> None:
        self._result = None


class GpuExecution:
    """The whole frame (all DDIM steps, the update, the context encode, the ring write) as one
    CUDA graph. Two graphs alternate by frame parity k = n % 2, so frame n+1's input uploads and
    frame n's output downloads on a copy stream while the other graph computes; pinned host
    buffers and events order them. `gpu` is runtime.gpu's CudaGpu (engines on raw device pointers) by
    default, the torch side's TorchGpu for the PyTorch backend (model/torch_device.py)."""

    def __init__(self, backend, unit, cuda_graph: bool, frames: str, gpu=None):
        from mirage.runtime.gpu import CudaGpu

        self.backend, self.unit, self.cuda_graph, self.frames = backend, unit, cuda_graph, frames
        self.gpu = gpu or CudaGpu(backend.device)
        self.ops = self.gpu.ops
        backend.use_stream(self.gpu.compute)  # engines enqueue on the stream the graph captures
        self.graphs: list = []
        self.timeline: list[dict] = []  # per frame, GPU event times in ms
        self._pending: list[int] = []
        self._frame = 0

    def alloc(self, shape, dtype: str):
        return self.gpu.zeros(shape, dtype)

    def prepare(self, buf: Buffers) -> None:
        gpu, self.buf = self.gpu, buf
        # Parity-indexed staging: device input/output and pinned host buffers; with uint8 frames the
        # stages hold (B, H, W, C) bytes and the frame's ops convert, plus a (B,) finite flag per frame.
        def stage(like):
            b, c, h, w = like.shape
            u8 = self.frames == "uint8"
            return gpu.zeros((b, h, w, c), "uint8") if u8 else gpu.zeros(like.shape, _dtype_name(like))

        self.cond_stage = None if buf.input is None else [stage(buf.input) for _ in range(2)]
        self.advance_stage = [gpu.zeros(buf.advance.shape, "int64") for _ in range(2)]
        for advance in self.advance_stage:
            self.ops.fill_(advance, 1)
        self.host_advance = [gpu.pinned(buf.advance) for _ in range(2)]
        # the unit's per-unit host inputs (the DiT's RoPE angles, cache slots, ...), staged as the advance flags
        self.host_stage = {name: [gpu.zeros(b.shape, _dtype_name(b)) for _ in range(2)] for name, b in buf.host.items()}
        self.host_pinned = {name: [gpu.pinned(b) for b in stages] for name, stages in self.host_stage.items()}
        # the warm-up and capture run a unit that commits nothing on these (a DiT block at each row's frame:
        # zeros would mask every key, and the NaN of an empty softmax would land in the cache)
        idle = self.unit.host_inputs(np.zeros(buf.advance.shape, np.int64))
        for name, array in idle.items():
            for host, staged in zip(self.host_pinned[name], self.host_stage[name]):
                host[...] = array
                gpu.upload(staged, host)
        if idle:
            gpu.synchronize()
        self._between_pinned: dict[int, np.ndarray] = {}  # between_units' host staging, per buffer
        self.frame_out = [stage(buf.frame) for _ in range(2)]
        self.finite_out = [gpu.zeros((buf.frame.shape[0],), "uint8") for _ in range(2)] \
            if self.frames == "uint8" else []
        self.host_in = None if self.cond_stage is None else [gpu.pinned(s) for s in self.cond_stage]
        self.host_out = [gpu.pinned(s) for s in self.frame_out]
        self.host_finite = [gpu.pinned(s) for s in self.finite_out]
        ev = lambda: [gpu.event() for _ in range(2)]  # noqa: E731
        self.ev_up, self.ev_start, self.ev_done, self.ev_down, self.ev_up0 = ev(), ev(), ev(), ev(), ev()
        # One eager frame per graph (allocator, kernels, autotuning), then capture; eager on failure.
        gpu.warm_up(lambda: [self._frame_body(k) for k in range(2)], for_capture=self.cuda_graph)
        # an engine may say up front that its enqueue cannot be captured (TensorRT's
        # is_stream_capturable, asked after the warm-up bound it); other backends have no such question
        refusal = getattr(self.backend, "capture_refusal", None)
        why = refusal(gpu.compute) if refusal and self.cuda_graph else None
        if why:
            warnings.warn(f"no CUDA graph: {why}; running eagerly", stacklevel=3)
        elif self.cuda_graph:
            try:
                self.graphs = [gpu.capture(lambda k=k: self._frame_body(k)) for k in range(2)]
                self._captured = self._pointers()
            except Exception as e:  # noqa: BLE001 (capture fails on ops that sync or allocate; eager still works)
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", stacklevel=3)
                self.graphs = []
                gpu.synchronize()

    def _frame_body(self, k: int) -> None:
        """Graph k: the frame, reading staged input k and writing output k."""
        u8 = self.frames == "uint8"
        if self.cond_stage is not None:
            if u8:
                self.ops.to_float_(self.buf.input, self.cond_stage[k])
            else:
                self.gpu.copy(self.buf.input, self.cond_stage[k])
        self.gpu.copy(self.buf.advance, self.advance_stage[k])
        for name, stages in self.host_stage.items():
            self.gpu.copy(self.buf.host[name], stages[k])
        self.unit.run(self.backend, self.ops, self.buf)
        if u8:
            self.ops.to_uint8_(self.frame_out[k], self.finite_out[k], self.buf.frame)
        else:
            self.gpu.copy(self.frame_out[k], self.buf.frame)

    def _pointers(self) -> list[int]:
        extra = self.frame_out + self.finite_out + self.advance_stage + (self.cond_stage or []) + \
            [b for stages in self.host_stage.values() for b in stages]
        return [t.data_ptr() for t in self.buf.all() + extra]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, cond: np.ndarray | None, advance: np.ndarray) -> None:
        gpu, k = self.gpu, self._frame % 2
        compute, copy = gpu.compute, gpu.copy_stream
        if self.graphs and self._pointers() != self._captured:
            raise RuntimeError("a buffer moved since capture; the graphs are stale")
        self.ev_up0[k].record(copy)
        self.ev_done[k].wait(copy)  # graph n-2 finished reading stage k
        if cond is not None:
            self.host_in[k][...] = to_stage(cond, self.frames)
            gpu.upload(self.cond_stage[k], self.host_in[k])
        self.host_advance[k][...] = advance
        gpu.upload(self.advance_stage[k], self.host_advance[k])
        for name, array in self.unit.host_inputs(advance).items():
            self.host_pinned[name][k][...] = array
            gpu.upload(self.host_stage[name][k], self.host_pinned[name][k])
        self.ev_up[k].record(copy)
        self.ev_up[k].wait(compute)
        self.ev_down[k].wait(compute)  # frame n-2's output k has been downloaded
        self.ev_start[k].record(compute)
        with gpu.on_compute():  # torch enqueues on the thread's current stream; this thread's may be another
            if self.graphs:
                self.graphs[k].replay()
            else:
                self._frame_body(k)
        self.ev_done[k].record(compute)
        self.ev_done[k].wait(copy)
        gpu.download(self.host_out[k], self.frame_out[k])
        if self.finite_out:
            gpu.download(self.host_finite[k], self.finite_out[k])
        self.ev_down[k].record(copy)
        self._pending.append(self._frame)
        self._frame += 1

    def collect(self) -> np.ndarray:
        n = self._pending.pop(0)
        k = n % 2
        up0, up, start, done, down = (ev[k] for ev in (self.ev_up0, self.ev_up, self.ev_start, self.ev_done,
                                                        self.ev_down))
        down.synchronize()
        self.timeline.append({"frame": n, "upload_ms": up0.elapsed_time(up), "compute_ms": start.elapsed_time(done),
                              "download_ms": done.elapsed_time(down),
                              "upload_end_to_compute_start_ms": up.elapsed_time(start)})
        del self.timeline[:-TIMELINE_KEEP]
        if self.frames == "uint8":
            frame, finite = self.host_out[k].copy(), self.host_finite[k].all()  # a copy: frame n+2 reuses stage k
        else:
            frame = from_stage(self.host_out[k])
            finite = np.isfinite(frame).all()
        if not finite:  # the frame (or its flags) is all the host sees of a GPU frame
            frame_graph, (memory_graph, _) = self.buf.made_by
            raise NonFiniteError(f"the frame is non-finite (NaN or Inf): the {frame_graph} or {memory_graph} graph "
                                 "produced it; the model or artifact is broken: re-export it, or check the weights")
        return frame

    def reset_rows(self, rows, seeds) -> None:
        """Stream-ordered: the reset's writes are enqueued on the compute stream, behind the frames
        already submitted and ahead of the next one, and the call returns without waiting for the GPU.
        (A device synchronize here drained both steps in flight and blocked the server's step thread
        on every attach: under churn 16 streams of `base` got 19 FPS each on an H100, docs/SERVING.md.)

        Why stream order is enough:
        (a) the frames in flight read and write memory, ages, slot and rng inside their graph (or
            eager body) on the compute stream; every write of the reset goes on that stream too
            (on_compute: CudaOps launch on it, torch ops go to the current stream, which it sets), so
            they see the old row, and every frame submitted later sees the new one;
        (b) their outputs download on the copy stream after their ev_done, recorded before the reset
            was enqueued, from frame_out / finite_out, which the reset does not write: the downloads
            neither wait for it nor race it;
        (c) the next submit uploads on the copy stream into cond_stage[k] and advance_stage[k], which
            the reset does not write; its graph copies them into buf.input / buf.advance on the compute
            stream, after the reset (which leaves those two alone): no buffer is written on both streams;
        (d) nothing is staged on the host: the seed is a kernel argument (TorchOps fill_, CudaOps'
            fill kernel), copied when the kernel is launched, so no host memory must outlive the call,
            and the pinned staging of the frames in flight is untouched;
        (e) CpuExecution.reset_rows writes in place at once, as before (no frame is ever in flight there).
        """
        with self.gpu.on_compute():
            for row, seed in zip(rows, seeds):
                self.unit.reset_row(self.ops, self.buf, row, seed)

    def between_units(self, body, writes: list) -> None:
        """`writes` [(buffer, host array)] uploaded, then body() on the compute stream, with every unit in
        flight finished first and the work done on return (a prompt change: rare, so it waits)."""
        self.gpu.synchronize()
        for buf, array in writes:
            host = self._between_pinned.get(buf.data_ptr())
            if host is None:
                host = self._between_pinned[buf.data_ptr()] = self.gpu.pinned(buf)
            host[...] = array
            self.gpu.upload(buf, host)
            self.gpu.synchronize()
        with self.gpu.on_compute():
            body()
        self.gpu.synchronize()

    def describe(self) -> tuple[str, float | None, str]:
        """(device name, peak memory in MiB, what the memory number means)."""
        return (self.gpu.device_name(), *self.gpu.memory_mb())

    def close(self) -> None:
        while self._pending:
            self.collect()
        self.gpu.synchronize()
        self.graphs = []
        self.gpu.close()


def _dtype_name(buf) -> str:
    return str(buf.dtype).split(".")[-1]  # "float16" of a DeviceBuffer or numpy array, "torch.float16" of a tensor
