"""TensorRT (10.x / 11.x) or TensorRT-RTX engines as a backend of the frame loop, on cuda-python
device buffers (no torch). Each graph is an engine.Engine (check -> load -> bind -> execute);
`run` binds the loop's buffers (set_input_shape for a dynamic batch, then addresses) and
enqueues execute_async_v3 on the pipeline's compute stream, so the whole frame is captured in
one CUDA graph with the loop's NVRTC kernels (runtime/gpu.py: CudaGpu).

The artifact's GPU is made current (runtime.cuda.use_device) before TensorRT deserializes
anything, and again before every later call: TensorRT allocates, loads its runtime cache and
enqueues on the current device, and the server drives pipelines of several GPUs from its threads.

Tested in CI against a test double of the TensorRT Python API (tests/trt_double.py); NOT
EXECUTED on a real engine in this project's workplace: full TensorRT is not installable there and
TensorRT-RTX does not run on its Hopper GPUs. The buffers, kernels, streams and graphs around it
run on the GPU machine (tests/gpu).
"""
from __future__ import annotations

from pathlib import Path

from mirage.core import graphs as G
from mirage.core.device import missing_gpu, sm_name
from mirage.core.errors import BackendError
from mirage.engine.build import load_backend, load_plugin
from mirage.engine.engine import Engine
from mirage.engine.manifest import EngineError, plugin_file, rebuild_command
from mirage.engine.verify import artifact_specs
from mirage.runtime import cuda


def gpu_index(device: str) -> int:
    """The GPU a TensorRT artifact runs on: auto and cuda mean cuda:0; the CPU is refused."""
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    if device == "cpu":
        raise BackendError("TensorRT engines run on a GPU, not --device cpu; to run the artifact's ONNX graphs "
                           "on the CPU pass --backend onnxruntime")
    raise BackendError(f"device {device!r}: TensorRT runs on cuda or cuda:N")


def preflight(manifest: dict, device: str):
    """What a TensorRT run needs, checked before any file is hashed or engine read: (the TensorRT
    module, the GPU index), with that GPU made current."""
    index = gpu_index(device)
    trt = load_backend(manifest["backend"]["name"])
    reason = missing_gpu(index)
    if reason:
        raise BackendError(f"the TensorRT backend needs an NVIDIA GPU: {reason}")
    try:
        cuda.use_device(index)
    except cuda.CudaError as e:  # cuda-python missing, or the device refused
        raise BackendError(str(e)) from e
    return trt, index


class TensorRTBackend:
    def __init__(self, artifact: Path, manifest: dict, specs: dict, device: str = "cuda:0"):
        trt, self.index = preflight(manifest, device)  # the device is current from here on
        self.device = f"cuda:{self.index}"
        self.stream = None
        self.specs = specs
        _, built = artifact_specs(manifest)  # at the batch the engines were built for (specs: the one run)
        plugin = plugin_file(manifest, artifact)
        self.engines = {g: Engine(artifact, manifest, g, built[g]) for g in manifest["graphs"]}
        for engine in self.engines.values():
            engine.check(trt, sm_name(self.index), plugin)
        if plugin:  # before deserializing: the engine's plugin layers are looked up in the registry
            self._load_plugin(trt, plugin, rebuild_command(manifest, artifact))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if manifest["build_options"].get("version_compatible"):
            # such a plan carries the lean runtime's host code, which TensorRT runs only when allowed
            self.runtime.engine_host_code_allowed = True
        for engine in self.engines.values():
            engine.load(trt, self.runtime)

    @staticmethod
    def _load_plugin(trt, plugin: Path, rebuild: str) -> None:
        registered = trt.get_plugin_registry().get_creator(G.PLUGIN_NAME, G.PLUGIN_VERSION, G.PLUGIN_NAMESPACE)
        if not load_plugin(trt, plugin) and registered is None:
            raise EngineError(f"{plugin}: TensorRT loaded no plugin from it (not a TensorRT plugin library, or one "
                              f"for another TensorRT); rebuild: {rebuild}")

    def buffer_dtype(self, graph: str, name: str) -> str:
        return self.specs[graph].tensor(name).dtype

    def use_stream(self, stream) -> None:
        self.stream = stream

    def run(self, graph, inputs, output):
        if self.stream is None:
            raise BackendError("TensorRTBackend.run before the pipeline set its stream")
        cuda.use_device(self.index)
        engine, spec = self.engines[graph], self.specs[graph]
        buffers = {**inputs, **(output if isinstance(output, dict) else {spec.output.name: output})}
        engine.bind({name: buf.data_ptr() for name, buf in buffers.items()},
                    {name: buf.shape for name, buf in inputs.items()})
        engine.execute(self.stream)

    def capture_refusal(self, stream) -> str | None:
        """Why the frame may not be stream-captured on `stream` (asked after the warm-up bound every
        engine), or None: runtime.execution then runs the frames eagerly."""
        cuda.use_device(self.index)
        refused = [g for g, engine in self.engines.items() if not engine.capturable(stream)]
        if not refused:
            return None
        return (f"TensorRT says the {', '.join(refused)} engine(s) cannot be stream-captured (an engine built "
                "without REQUIRE_USER_ALLOCATION, or with data-dependent shapes: rebuild it with mirage-export)")

    def close(self):
        if not self.engines:
            return
        cuda.use_device(self.index)
        for engine in self.engines.values():
            engine.save_runtime_cache()
            engine.close()
        self.engines.clear()
