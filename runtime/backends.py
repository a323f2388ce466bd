"""Backends: the one thin layer that differs between ONNX Runtime, PyTorch and TensorRT.

A backend runs a graph on buffers the pipeline allocated (`run(graph, inputs, output)`) and
says which array library and device those buffers live on. Everything else, the loop, the
ring buffer, CUDA graphs and streams, is shared (loop.py, pipeline.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mirage.core import graphs as G


class BackendError(RuntimeError):
    """A backend that cannot be used here; the message says what to install or rebuild."""


class OrtBackend:
    """ONNX Runtime on numpy buffers (CPU EP: the no-GPU default)."""

    array = "numpy"
    device = "cpu"

    def __init__(self, files: dict[str, Path], providers: list[str] | None = None):
        try:
            self.sessions = {g: ort_session(f, providers) for g, f in files.items()}
        except ImportError as e:
            raise BackendError("the onnxruntime backend needs `pip install onnxruntime`") from e
        self.output = {g: s.get_outputs()[0].name for g, s in self.sessions.items()}
        self.dtypes = {g: {i.name: _NP[i.type] for i in s.get_inputs()} for g, s in self.sessions.items()}

    def buffer_dtype(self, graph: str, name: str) -> str:
        if name == self.output[graph]:
            return _NP[self.sessions[graph].get_outputs()[0].type]
        return self.dtypes[graph][name]

    def run(self, graph, inputs, output):
        output[...] = self.sessions[graph].run(None, inputs)[0]

    def close(self):
        self.sessions.clear()


def ort_session(path: Path, providers: list[str] | None = None):
    """An ONNX Runtime session of one graph file, with the workaround every Mirage graph needs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ONNX Runtime 1.32's MatMulAddFusion turns a 3-D MatMul+Add (a Linear on tokens) between
    # INT8 Q/DQ pairs into a Gemm with a mistyped QuantizeLinear, and the session then fails to
    # load ("output_dtype INT8 does not match y_zero_point type UINT8"). The fusion is a small
    # CPU win; without it every precision loads.
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"],
                                    disabled_optimizers=["MatMulAddFusion"])
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, NoSuchFile, ...)
        raise BackendError(f"{path}: ONNX Runtime cannot load this graph ({type(e).__name__}: {e})") from e


_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(int64)": "int64"}


class TorchBackend:
    """The PyTorch model on torch buffers, eager or through torch.compile."""

    array = "torch"

    def __init__(self, model, device: str, dtype: str = "float32", compile_mode: str | None = None,
                 kernel_library: str | None = None):
        import torch

        self.device, self.dtype = str(device), dtype
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        if kernel_library:  # temporal attention through the fused plugins_cpp kernel
            if not self.device.startswith("cuda"):
                raise BackendError(f"the fused kernel library runs on CUDA devices, not {device!r}")
            from mirage.plugins_cpp import kernels

            try:
                kernels.use_in_torch(kernel_library)
            except (OSError, kernels.KernelError) as e:
                raise BackendError(f"{kernel_library}: {e}") from e
            self.model = self.model.with_attention(dataclasses.replace(self.model.attention, temporal="op"))
        self.denoise, self.context = self.model.denoise, self.model.context_encode
        if compile_mode:
            self.denoise = torch.compile(self.denoise, mode=compile_mode)
            self.context = torch.compile(self.context, mode=compile_mode)
        self.no_grad = torch.no_grad()

    def buffer_dtype(self, graph: str, name: str) -> str:
        return {G.T: "float32", G.T_CTX: "float32", G.AGES: "int32"}.get(name, self.dtype)

    def run(self, graph, inputs, output):
        with self.no_grad:
            if graph == G.DENOISE:
                out = self.denoise(inputs[G.X_T], inputs[G.T], inputs.get(G.COND), inputs[G.MEMORY], inputs[G.AGES])
            else:
                out = self.context(inputs[G.FRAME], inputs[G.T_CTX])
            output.copy_(out)

    def close(self):
        self.model = self.denoise = self.context = None


class TensorRTBackend:
    """TensorRT (10.x / 11.x) or TensorRT-RTX engines on cuda-python device buffers (no torch).

    Tensor addresses are bound once per buffer set, so `run` is a bare `execute_async_v3` on the
    pipeline's compute stream (`self.stream`, set by the pipeline) and the whole frame is
    captured in one CUDA graph with the loop's NVRTC kernels (runtime/gpu.py: CudaGpu).
    NOT EXECUTED in this project's workplace: full TensorRT is not installable there and
    TensorRT-RTX does not run on its Hopper GPUs; the buffers, kernels, streams and graphs around
    it are (tests/gpu/test_gpu_cuda_runtime.py).
    """

    array = "cuda"

    def __init__(self, artifact: Path, manifest: dict, device: str = "cuda"):
        from mirage.engine.build import load_backend
        from mirage.engine.manifest import check_engine_file, check_loadable

        from mirage.runtime.cuda import compute_capability

        self.device = device if ":" in device else "cuda:0"
        self.stream = None  # the pipeline's compute stream (a cudaStream_t), set before the first run
        trt = load_backend(manifest["backend"]["name"])
        cc = "sm%d%d" % compute_capability(int(self.device.split(":")[1]))
        plugin = (manifest.get("plugin") or {}).get("path")
        check_loadable(manifest, trt.__version__, cc, plugin)
        if plugin:  # before deserializing: the engine's plugin layers are looked up in the registry
            trt.get_plugin_registry().load_library(plugin)
        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.io = {}, {}, {}
        for graph, meta in manifest["graphs"].items():
            path = artifact / meta["engine"]
            check_engine_file(path, meta["engine_sha256"])
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"{path}: TensorRT could not deserialize the engine; rebuild with "
                                   f"`{manifest['rebuild_command']}`")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
            self.io[graph] = {x["name"]: x["dtype"] for x in meta["inputs"] + meta["outputs"]}
        self.bound: dict[str, dict[str, int]] = {g: {} for g in self.engines}

    def buffer_dtype(self, graph: str, name: str) -> str:
        return {"float": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}[self.io[graph][name]]

    def run(self, graph, inputs, output):
        ctx, bound = self.contexts[graph], self.bound[graph]
        out_name = G.V if graph == G.DENOISE else G.KV
        for name, buf in (*inputs.items(), (out_name, output)):
            if bound.get(name) != buf.data_ptr():  # rebinding only when a buffer moved
                if not ctx.set_tensor_address(name, buf.data_ptr()):
                    raise BackendError(f"TensorRT refused the address of {name!r}")
                bound[name] = buf.data_ptr()
        if self.stream is None:
            raise BackendError("TensorRTBackend.run before the pipeline set its stream")
        if not ctx.execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT execute_async_v3 failed for {graph}")

    def close(self):
        self.contexts.clear()
        self.engines.clear()
