"""One TensorRT engine with a plain lifecycle: check -> load -> bind -> execute (build is
engine.build.build_engine, run by mirage-export).

    engine = Engine(artifact_dir, manifest, "denoise", spec)   # spec: the GraphSpec the engine was built from
    engine.check(trt, "sm90", plugin_path)     # version, GPU, plugin and file hash against the manifest
    engine.load(trt, runtime)                   # deserialize (+ TensorRT-RTX's JIT runtime cache), check I/O
    engine.bind({"x_t": ptr, ...}, {"x_t": (1, 3, 64, 64), ...})   # shapes of dynamic inputs, then addresses
    engine.capturable(stream)                   # may this context's enqueue be stream-captured?
    engine.execute(stream)                      # execute_async_v3: what the frame's CUDA graph captures
    engine.save_runtime_cache()                 # TensorRT-RTX: keep the kernels it compiled for this GPU

The caller makes the engine's GPU current before load and every later call (TensorRT
deserializes, allocates and enqueues on the current device): runtime.tensorrt does.

Works with `tensorrt` (10.x / 11.x) and `tensorrt_rtx`. Run in CI against a test double of the
TensorRT Python API (tests/trt_double.py, its names and signatures checked against the installed
tensorrt_rtx); NOT EXECUTED on a real engine in this project's workplace: full TensorRT is not
installable there and TensorRT-RTX does not run on its Hopper GPUs.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from mirage.core import graphs as G
from mirage.engine.manifest import EngineError, check_loadable, rebuild_command
from mirage.engine.verify import check_signature, verify_file

# TensorRT DataType member -> the numpy name the specs use
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8"}


class Engine:
    def __init__(self, artifact: Path, manifest: dict, graph: str, spec: G.GraphSpec):
        self.artifact, self.manifest, self.graph, self.spec = Path(artifact), manifest, graph, spec
        meta = manifest["graphs"][graph]
        self.path = self.artifact / meta["engine"]
        self.sha256 = meta["engine_sha256"]
        self.rtx = manifest["backend"]["name"] == "tensorrt-rtx"
        self.cache_path = self.artifact / G.runtime_cache_file(graph)
        # the runtime config lives as long as the context made from it (TensorRT keeps no reference)
        self.engine = self.config = self.context = self.runtime_cache = None
        self.bound: dict[str, int] = {}

    def check(self, trt, gpu_cc: str | None, plugin_path: str | None) -> None:
        check_loadable(self.manifest, trt.__version__, gpu_cc, plugin_path, self.artifact)
        verify_file(self.path, self.sha256, self.artifact, rebuild_command(self.manifest, self.artifact))

    def load(self, trt, runtime) -> None:
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:  # version, GPU, hash and plugin were checked: what is left is TensorRT's own refusal
            raise EngineError(f"{self.path}: TensorRT could not deserialize the engine (see its log above); "
                              f"rebuild: {rebuild_command(self.manifest, self.artifact)}")
        check_signature(self.graph, self._io(trt), self.spec, rebuild_command(self.manifest, self.artifact),
                        source="the engine")
        if self.rtx:
            # TensorRT-RTX compiles kernels for this GPU just in time; its runtime cache keeps them,
            # so the first frame after the next load is not a compile.
            self.config = self.engine.create_runtime_config()
            self.runtime_cache = self.config.create_runtime_cache()
            if self.cache_path.is_file() and not self.runtime_cache.deserialize(self.cache_path.read_bytes()):
                # rejected, not half-loaded: another GPU, driver or TensorRT-RTX wrote it; close() replaces it
                warnings.warn(f"{self.cache_path}: runtime cache from another GPU, driver or TensorRT-RTX version; "
                              "kernels are compiled again this time", stacklevel=2)
            if not self.config.set_runtime_cache(self.runtime_cache):
                raise EngineError(f"{self.path}: TensorRT-RTX refused its runtime cache")
            self.context = self.engine.create_execution_context(self.config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")

    def _io(self, trt) -> tuple[list[dict], list[dict]]:
        """(inputs, outputs) the engine really has, in the manifest's form."""
        engine, io = self.engine, ([], [])
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            if mode not in (trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT):
                raise EngineError(f"{self.graph}: engine tensor {name!r} is neither an input nor an output")
            dtype = engine.get_tensor_dtype(name).name
            io[1 if mode == trt.TensorIOMode.OUTPUT else 0].append(
                {"name": name, "dtype": DTYPES.get(dtype, dtype), "shape": list(engine.get_tensor_shape(name))})
        return io

    def bind(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        """Input shapes first (a dynamic batch must be set before the warm-up and the capture),
        then every tensor's address; rebinding only what moved."""
        ctx = self.context
        for name, shape in shapes.items():
            if -1 in tuple(self.engine.get_tensor_shape(name)) and tuple(ctx.get_tensor_shape(name)) != tuple(shape):
                if not ctx.set_input_shape(name, tuple(shape)):
                    raise EngineError(f"{self.graph}: TensorRT refused shape {tuple(shape)} for {name!r} "
                                      f"(outside the engine's optimization profile)")
        for name, ptr in addresses.items():
            if self.bound.get(name) != ptr:
                if not ctx.set_tensor_address(name, ptr):
                    raise EngineError(f"{self.graph}: TensorRT refused the address of {name!r}")
                self.bound[name] = ptr
        if not ctx.all_binding_shapes_specified:
            raise EngineError(f"{self.graph}: input shapes left unspecified after binding")

    def capturable(self, stream) -> bool:
        """Whether this context's enqueue may be stream-captured (asked after bind: it depends on the
        shapes). TensorRT-RTX answers (IExecutionContext.is_stream_capturable, which needs the
        REQUIRE_USER_ALLOCATION build flag engine.build sets); a TensorRT without the call has
        no runtime allocations to refuse capture for."""
        ask = getattr(self.context, "is_stream_capturable", None)
        return True if ask is None else bool(ask(int(stream)))

    def execute(self, stream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise EngineError(f"TensorRT execute_async_v3 failed for {self.graph}")

    def save_runtime_cache(self) -> None:
        if self.runtime_cache is None:
            return
        try:
            self.cache_path.write_bytes(bytes(self.runtime_cache.serialize()))
        except OSError:
            pass  # a read-only artifact folder: the cache is an optimisation, the engine still runs

    def close(self) -> None:
        # the context before the config and engine it was made from
        self.context = None
        self.config = self.runtime_cache = self.engine = None
