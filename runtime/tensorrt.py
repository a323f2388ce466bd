"""TensorRT (10.x / 11.x) or TensorRT-RTX engines as a backend of the frame loop, on cuda-python
device buffers (no torch). Each graph is an engine.Engine (check -> load -> bind -> execute);
`run` binds the loop's buffers (set_input_shape for a dynamic batch, then addresses) and
enqueues execute_async_v3 on the pipeline's compute stream, so the whole frame is captured in
one CUDA graph with the loop's NVRTC kernels (runtime/gpu.py: CudaGpu).

NOT EXECUTED in this project's workplace: full TensorRT is not installable there and TensorRT-RTX
does not run on its Hopper GPUs; the buffers, kernels, streams and graphs around it are
(tests/gpu), and everything up to deserialization is tested on the CPU.
"""
from __future__ import annotations

from pathlib import Path

from mirage.core.device import sm_name
from mirage.core.errors import BackendError
from mirage.engine.build import load_backend
from mirage.engine.engine import Engine

TRT_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}


class TensorRTBackend:
    def __init__(self, artifact: Path, manifest: dict, specs: dict, device: str = "cuda:0"):
        self.device = device if ":" in device else "cuda:0"
        self.stream = None
        self.specs = specs
        trt = load_backend(manifest["backend"]["name"])
        cc = sm_name(int(self.device.split(":")[1]))
        plugin = (manifest.get("plugin") or {}).get("path")
        self.engines = {g: Engine(artifact, manifest, g) for g in manifest["graphs"]}
        for engine in self.engines.values():
            engine.check(trt, cc, plugin)
        if plugin:  # before deserializing: the engine's plugin layers are looked up in the registry
            trt.get_plugin_registry().load_library(plugin)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        for engine in self.engines.values():
            engine.load(trt, self.runtime)

    def buffer_dtype(self, graph: str, name: str) -> str:
        return self.specs[graph].tensor(name).dtype

    def use_stream(self, stream) -> None:
        self.stream = stream

    def run(self, graph, inputs, output):
        if self.stream is None:
            raise BackendError("TensorRTBackend.run before the pipeline set its stream")
        engine, spec = self.engines[graph], self.specs[graph]
        buffers = {**inputs, spec.output.name: output}
        engine.bind({name: buf.data_ptr() for name, buf in buffers.items()},
                    {name: buf.shape for name, buf in inputs.items()})
        engine.execute(self.stream)

    def close(self):
        for engine in self.engines.values():
            engine.save_runtime_cache()
            engine.close()
        self.engines.clear()
