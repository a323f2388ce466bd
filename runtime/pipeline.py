"""The embeddable runtime: a Mirage model as a frame source with a plain lifecycle.

    load -> allocate -> warm up -> capture -> replay ... -> close

    from mirage.runtime import Pipeline
    with Pipeline.load("artifacts/tiny") as pipe:      # artifact dir or checkpoint folder
        pipe.reset(seed=0)
        frames = [pipe.step() for _ in range(48)]      # (H, W, 3) float32 in [-1, 1]

On a GPU (PyTorch or TensorRT backends) every buffer is allocated once, the whole frame
(all DDIM steps, the update, the context encode and the ring write) is captured into a CUDA
graph, and frames are replayed with no host work in between. Two graphs alternate (frame
parity) so that the input of frame n+1 uploads and the output of frame n downloads on a
copy stream while the other graph computes; pinned host buffers and events order them.
Without a GPU (ONNX Runtime CPU EP, or PyTorch on the CPU) the same loop runs eagerly.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mirage.core import graphs as G
from mirage.runtime.backends import BackendError, OrtBackend, TensorRTBackend, TorchBackend
from mirage.core.loop import Buffers, NumpyOps, Schedule, reset_memory, run_frame
from mirage.core.schedule import ALPHAS_CUMPROD, ddim_coefficients, default_steps

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class PipelineError(RuntimeError):
    """Misuse of the pipeline (wrong state, wrong input); the message says what to do."""


def _source(path: Path) -> tuple[str, dict]:
    """('artifact', manifest) or ('checkpoint', config.json meta)."""
    import json

    if (path / G.MANIFEST).is_file():
        return "artifact", json.loads((path / G.MANIFEST).read_text())
    if (path / "config.json").is_file():
        return "checkpoint", json.loads((path / "config.json").read_text())
    raise PipelineError(f"{path}: neither an artifact (manifest.json) nor a checkpoint (config.json)")


class Pipeline:
    def __init__(self, backend, shapes: dict[str, tuple[int, ...]], video_to_video: bool, steps: int = 4,
                 context_noise: int = 100, cuda_graph: bool = True):
        self.backend, self.shapes, self.v2v = backend, shapes, video_to_video
        self.schedule = Schedule.make(ddim_coefficients(steps), ALPHAS_CUMPROD[context_noise], context_noise)
        self.cuda_graph = cuda_graph and str(backend.device).startswith("cuda")
        self.gpu = None  # TorchGpu / CudaGpu once allocated on a GPU
        self.state = "loaded"
        self.graphs: list = []
        self.timeline: list[dict] = []  # per frame, GPU event times in ms (GPU path)
        self._frame = 0

    # -- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "auto", dtype: str | None = None,
             steps: int | None = None, context_noise: int = 100, cuda_graph: bool = True,
             compile_mode: str | None = None, kernel_library: str | None = None) -> "Pipeline":
        """Open an artifact directory (ONNX / engines + manifest) or a checkpoint folder; steps=None
        samples with the model's recorded step count (a distilled student's), else 4."""
        path = Path(path)
        if backend not in BACKENDS:
            raise PipelineError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        kind, meta = _source(path)
        steps = steps or default_steps(meta)
        if kind == "checkpoint":
            if backend not in ("auto", "torch"):
                raise PipelineError(f"{path} is a checkpoint: only the torch backend runs it; "
                                    f"export it with `mirage-export --checkpoint {path}` for {backend}")
            return cls._from_checkpoint(path, device, dtype, steps, context_noise, cuda_graph, compile_mode,
                                        kernel_library)
        if kernel_library:
            raise PipelineError("--kernel-library is for the torch backend (checkpoints); an artifact takes the "
                                "fused kernel as the TensorRT plugin (`mirage-export --temporal-attention plugin`)")
        video_to_video = bool(meta["model"]["cond_channels"])
        # a dynamic batch dim (-1) runs at the artifact's batch
        shapes = {x["name"]: tuple(meta.get("batch", 1) if d == -1 else d for d in x["shape"])
                  for g in meta["graphs"].values() for x in g["inputs"] + g["outputs"]}
        has_engine = all(g.get("engine") for g in meta["graphs"].values())
        if backend == "tensorrt" or (backend == "auto" and has_engine and _cuda_available()):
            if not has_engine:
                raise PipelineError(f"{path} has no engines; build them with `mirage-export --backend tensorrt`")
            impl = TensorRTBackend(path, meta, device="cuda:0" if device == "auto" else device)
        elif backend in ("auto", "onnxruntime"):
            impl = OrtBackend({g: path / m["onnx"] for g, m in meta["graphs"].items()})
        else:
            raise PipelineError(f"{path} is an artifact; the torch backend runs checkpoints (pass the checkpoint "
                                f"folder {meta['checkpoint']['path']})")
        return cls(impl, shapes, video_to_video, steps, context_noise, cuda_graph)

    @classmethod
    def _from_checkpoint(cls, path, device, dtype, steps, context_noise, cuda_graph, compile_mode, kernel_library):
        try:
            import torch
        except ImportError as e:
            raise BackendError("running a checkpoint needs PyTorch; or export it to an artifact") from e
        from mirage.train.checkpoint import load_checkpoint

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model, _ = load_checkpoint(path)
        return cls.from_model(model, dev, dtype, steps, context_noise, cuda_graph, compile_mode,
                              kernel_library=kernel_library)

    @classmethod
    def from_model(cls, model, device: str, dtype: str | None = None, steps: int = 4, context_noise: int = 100,
                   cuda_graph: bool = True, compile_mode: str | None = None, batch: int = 1,
                   kernel_library: str | None = None) -> "Pipeline":
        """A pipeline around an in-memory MirageUNet (the PyTorch backend); `kernel_library`
        (libmirage_kernels.so, CUDA only) runs temporal attention with the fused kernel."""
        cfg = model.cfg
        img = (batch, cfg.channels, cfg.image_size, cfg.image_size)
        shapes = {G.X_T: img, G.COND: img, G.V: img, G.FRAME: img, G.T: (batch,), G.T_CTX: (batch,),
                  G.MEMORY: (batch, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim),
                  G.AGES: (batch, cfg.context_frames), G.KV: (batch, 2, cfg.memory_tokens, cfg.temporal_dim)}
        dtype = dtype or ("float16" if str(device).startswith("cuda") else "float32")
        impl = TorchBackend(model, device, dtype, compile_mode, kernel_library)
        return cls(impl, shapes, bool(cfg.cond_channels), steps, context_noise, cuda_graph)

    # -- allocate -----------------------------------------------------------------------------
    def _alloc(self, name: str, graph: str, shape=None, dtype=None):
        shape = shape or self.shapes[name]
        dtype = dtype or self.backend.buffer_dtype(graph, name)
        if self.gpu is not None:
            return self.gpu.zeros(shape, dtype)
        if self.backend.array == "numpy":
            return np.zeros(shape, dtype=dtype)
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=self.backend.device)

    def _fill(self, buf, value: float) -> None:
        if self.backend.array == "cuda":
            self.gpu.ops.fill_(buf, value)
        else:
            buf[...] = value

    def allocate(self) -> None:
        if self.state == "closed":
            raise PipelineError("pipeline is closed; load a new one")
        self.gpu = _gpu_for(self.backend)
        d, c = G.DENOISE, G.CONTEXT
        t = [self._alloc(G.T, d) for _ in self.schedule.timesteps]
        for buf, value in zip(t, self.schedule.timesteps):
            self._fill(buf, value)
        t_ctx = self._alloc(G.T_CTX, c)
        self._fill(t_ctx, self.schedule.t_ctx)
        self.buf = Buffers(
            x=self._alloc(G.X_T, d), v=self._alloc(G.V, d), frame=self._alloc(G.X_T, d),
            noise=self._alloc(G.FRAME, c), ctx=self._alloc(G.FRAME, c), kv=self._alloc(G.KV, c),
            memory=self._alloc(G.MEMORY, d), ages=self._alloc(G.AGES, d),
            slot=self._alloc("slot", d, (1,), "int64"), t=t, t_ctx=t_ctx,
            cond=self._alloc(G.COND, d) if self.v2v else None)
        if self.gpu is not None:
            self.ops = self.gpu.ops
            if self.backend.array == "cuda":
                self.backend.stream = self.gpu.compute  # engines enqueue on the stream the graph captures
            self._alloc_gpu_io()
        elif self.backend.array == "numpy":
            self.ops = NumpyOps()
        else:
            from mirage.model.torch_ops import TorchOps

            self.ops = TorchOps(self.backend.device)
        self.state = "allocated"

    def _alloc_gpu_io(self) -> None:
        gpu, b = self.gpu, self.buf
        # Parity-indexed (frame n uses index n % 2) staging: device input/output and pinned host.
        self.cond_stage = [gpu.zeros(b.x.shape, _dtype_name(b.x)) for _ in range(2)] if self.v2v else None
        self.frame_out = [gpu.zeros(b.x.shape, _dtype_name(b.x)) for _ in range(2)]
        self.host_in = [gpu.pinned(b.x) for _ in range(2)]
        self.host_out = [gpu.pinned(b.x) for _ in range(2)]
        ev = lambda: [gpu.event() for _ in range(2)]  # noqa: E731
        self.ev_up, self.ev_start, self.ev_done, self.ev_down, self.ev_up0 = ev(), ev(), ev(), ev(), ev()
        self._pending: list[int] = []

    def _gpu_frame(self, k: int) -> None:
        """The body of graph k: the frame, reading staged input k and writing output k."""
        if self.v2v:
            self.gpu.copy(self.buf.cond, self.cond_stage[k])
        run_frame(self.backend, self.ops, self.buf, self.schedule)
        self.gpu.copy(self.frame_out[k], self.buf.frame)

    # -- warm up + capture ---------------------------------------------------------------------
    def warm_up_and_capture(self) -> None:
        """One eager frame per graph (allocator, kernels, autotuning), then capture; eager on failure."""
        if self.state != "allocated":
            raise PipelineError(f"warm up needs an allocated pipeline (state: {self.state})")
        if self.gpu is not None:
            self.gpu.warm_up(lambda: [self._gpu_frame(k) for k in range(2)], for_capture=self.cuda_graph)
            if self.cuda_graph:
                try:
                    self.graphs = [self.gpu.capture(lambda k=k: self._gpu_frame(k)) for k in range(2)]
                    self._graph_ptrs = self._pointers()
                except Exception as e:  # noqa: BLE001 (capture can fail on ops that sync or allocate; eager still works)
                    warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2)
                    self.graphs = []
                    self.gpu.synchronize()
        self.state = "ready"

    def _pointers(self) -> list[int]:
        b = self.buf
        tensors = [b.x, b.v, b.frame, b.noise, b.ctx, b.kv, b.memory, b.ages, b.slot, b.t_ctx, *b.t, *self.frame_out]
        tensors += (self.cond_stage or []) + ([b.cond] if b.cond is not None else [])
        return [t.data_ptr() for t in tensors]

    # -- replay -------------------------------------------------------------------------------
    def reset(self, seed: int = 0) -> None:
        """Empty the context memory and reseed the noise: the next frame starts a new video."""
        if self.state in ("loaded", "allocated"):
            if self.state == "loaded":
                self.allocate()
            self.warm_up_and_capture()
        if self.state == "closed":
            raise PipelineError("pipeline is closed; load a new one")
        if self.gpu is not None:
            self._drain()
            self.gpu.synchronize()
        reset_memory(self.ops, self.buf)
        self.ops.seed(seed)
        self._frame = 0
        self.timeline = []

    def submit(self, cond: np.ndarray | None = None) -> None:
        """Start a frame (GPU: asynchronously). `cond` is the (H, W, 3) input frame in [-1, 1] for
        video-to-video models."""
        if self.state != "ready":
            raise PipelineError("call reset(seed) before the first frame" if self.state in ("loaded", "allocated")
                                else "pipeline is closed; load a new one")
        if self.v2v != (cond is not None):
            raise PipelineError("this video-to-video model needs an input frame" if self.v2v
                                else "this generation model takes no input frame")
        chw = None
        if cond is not None:
            expected = self.shapes[G.X_T][2:] + (3,)
            if tuple(cond.shape) != expected:
                raise PipelineError(f"input frame has shape {tuple(cond.shape)}, the model takes {expected}; "
                                    "resize it (mirage.core.video_io.fit_square)")
            chw = np.ascontiguousarray(np.asarray(cond, dtype=np.float32).transpose(2, 0, 1))[None]
        if self.gpu is None:
            if chw is not None:
                if self.backend.array == "numpy":
                    self.buf.cond[...] = chw
                else:
                    import torch

                    self.buf.cond[...] = torch.from_numpy(chw)
            run_frame(self.backend, self.ops, self.buf, self.schedule)
            self._cpu_result = self.buf.frame.copy() if self.backend.array == "numpy" else \
                self.buf.frame.float().cpu().numpy()
            self._frame += 1
            return
        self._submit_gpu(chw)

    def _submit_gpu(self, chw: np.ndarray | None) -> None:
        gpu, k = self.gpu, self._frame % 2
        compute, copy = gpu.compute, gpu.copy_stream
        if len(self._pending) == 2:  # the host buffers of frame n-2 are about to be reused
            self.collect()
        if self.graphs and self._pointers() != self._graph_ptrs:
            raise PipelineError("a buffer moved since capture; the graphs are stale (reload the pipeline)")
        gpu.record(self.ev_up0[k], copy)
        if chw is not None:
            self.host_in[k][...] = chw
            gpu.wait(copy, self.ev_done[k])  # graph n-2 finished reading stage k
            gpu.upload(self.cond_stage[k], self.host_in[k])
        gpu.record(self.ev_up[k], copy)
        gpu.wait(compute, self.ev_up[k])
        gpu.wait(compute, self.ev_down[k])  # frame n-2's output k has been downloaded
        gpu.record(self.ev_start[k], compute)
        if self.graphs:
            gpu.replay(self.graphs[k])
        else:
            self._gpu_frame(k)
        gpu.record(self.ev_done[k], compute)
        gpu.wait(copy, self.ev_done[k])
        gpu.download(self.host_out[k], self.frame_out[k])
        gpu.record(self.ev_down[k], copy)
        self._pending.append(self._frame)
        self._frame += 1

    def collect(self) -> np.ndarray:
        """Wait for the oldest submitted frame and return it as (H, W, 3) float32."""
        if self.gpu is None:
            return self._cpu_result[0].transpose(1, 2, 0).astype(np.float32)
        if not self._pending:
            raise PipelineError("collect() without a submitted frame")
        n = self._pending.pop(0)
        k, gpu = n % 2, self.gpu
        gpu.sync_event(self.ev_down[k])
        ms = gpu.elapsed_ms
        self.timeline.append({"frame": n, "upload_ms": ms(self.ev_up0[k], self.ev_up[k]),
                              "compute_ms": ms(self.ev_start[k], self.ev_done[k]),
                              "download_ms": ms(self.ev_done[k], self.ev_down[k]),
                              "upload_end_to_compute_start_ms": ms(self.ev_up[k], self.ev_start[k])})
        return self.host_out[k][0].transpose(1, 2, 0).astype(np.float32)

    def _drain(self) -> None:
        while getattr(self, "_pending", None):
            self.collect()

    def step(self, cond: np.ndarray | None = None) -> np.ndarray:
        """One frame, synchronously: submit, then collect."""
        self.submit(cond)
        return self.collect()

    def stream(self, inputs: Iterable[np.ndarray | None] | int) -> Iterator[np.ndarray]:
        """Frames for an input stream (or a frame count for generation), one frame in flight
        ahead: frame n+1's input uploads while frame n computes and downloads."""
        items = iter([None] * inputs) if isinstance(inputs, int) else iter(inputs)
        gpu = self.gpu is not None
        for cond in items:
            self.submit(cond)
            if not gpu or len(self._pending) == 2:
                yield self.collect()
        if gpu:
            while self._pending:
                yield self.collect()

    # -- close --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.state == "closed":
            return
        if self.gpu is not None:
            self._drain()
            self.gpu.synchronize()
        self.graphs = []
        self.backend.close()
        if self.gpu is not None:
            self.gpu.close()
        self.buf = None
        self.state = "closed"

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gpu_for(backend):
    """The GPU plumbing matching the backend's buffers, or None on the CPU."""
    if not str(backend.device).startswith("cuda"):
        return None
    from mirage.runtime.gpu import CudaGpu, TorchGpu

    return (TorchGpu if backend.array == "torch" else CudaGpu)(backend.device)


def _dtype_name(buf) -> str:
    return buf.dtype if isinstance(buf.dtype, str) else str(buf.dtype).split(".")[1]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        try:
            from cuda.bindings import runtime as rt

            err, count = rt.cudaGetDeviceCount()
            return int(err) == 0 and count > 0
        except ImportError:
            return False


__all__ = ["Pipeline", "PipelineError"]
