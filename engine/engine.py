"""One TensorRT engine with a plain lifecycle: check -> load -> bind -> execute (build is
engine.build.build_engine, run by mirage-export).

    engine = Engine(artifact_dir, manifest, "denoise")
    engine.check(trt, "sm90", plugin_path)     # version, GPU, plugin and file hash against the manifest
    engine.load(runtime)                        # deserialize (+ TensorRT-RTX's JIT runtime cache)
    engine.bind({"x_t": ptr, ...}, {"x_t": (1, 3, 64, 64), ...})   # shapes of dynamic inputs, then addresses
    engine.execute(stream)                      # execute_async_v3: what the frame's CUDA graph captures
    engine.save_runtime_cache()                 # TensorRT-RTX: keep the kernels it compiled for this GPU

Works with `tensorrt` (10.x / 11.x) and `tensorrt_rtx`. NOT EXECUTED in this project's workplace:
full TensorRT is not installable there and TensorRT-RTX does not run on its Hopper GPUs.
"""
from __future__ import annotations

from pathlib import Path

from mirage.core import graphs as G
from mirage.engine.manifest import EngineError, check_loadable, rebuild_command
from mirage.engine.verify import verify_file


class Engine:
    def __init__(self, artifact: Path, manifest: dict, graph: str):
        self.artifact, self.manifest, self.graph = Path(artifact), manifest, graph
        meta = manifest["graphs"][graph]
        self.path = self.artifact / meta["engine"]
        self.sha256 = meta["engine_sha256"]
        self.rtx = manifest["backend"]["name"] == "tensorrt-rtx"
        self.cache_path = self.artifact / G.runtime_cache_file(graph)
        self.engine = self.context = self.runtime_cache = None
        self.bound: dict[str, int] = {}

    def check(self, trt, gpu_cc: str | None, plugin_path: str | None) -> None:
        check_loadable(self.manifest, trt.__version__, gpu_cc, plugin_path, self.artifact)
        verify_file(self.path, self.sha256, self.artifact, rebuild_command(self.manifest, self.artifact))

    def load(self, trt, runtime) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT could not deserialize the engine; rebuild: "
                              f"{rebuild_command(self.manifest, self.artifact)}")
        if self.rtx:
            # TensorRT-RTX compiles kernels for this GPU just in time; its runtime cache keeps them,
            # so the first frame after the next load is not a compile.
            config = self.engine.create_runtime_config()
            self.runtime_cache = config.create_runtime_cache()
            if self.cache_path.is_file():
                self.runtime_cache.deserialize(self.cache_path.read_bytes())
            config.set_runtime_cache(self.runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")

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
        self.context = self.engine = self.runtime_cache = None
