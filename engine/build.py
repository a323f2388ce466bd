"""Build TensorRT / TensorRT-RTX engines from ONNX: strongly typed networks only.

TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrator: a graph's precision
is what its ONNX says (fp16 tensors, Q/DQ nodes). TensorRT 10.x gets the STRONGLY_TYPED
network flag; TensorRT-RTX networks are always strongly typed. TensorRT-RTX builds ahead of
time on a machine without a GPU, for the compute capabilities it is given (it has no sm90:
it does not run on Hopper); its timing cache is a no-op, so only full TensorRT keeps one.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .manifest import EngineError

MODULES = {"tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx"), "tensorrt": ("tensorrt", "tensorrt")}


def load_backend(name: str):
    if name not in MODULES:
        raise EngineError(f"backend {name!r}: choose one of {', '.join(MODULES)}")
    module, extra = MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineError(f"{name} is not installed: pip install -e \".[{extra}]\"") from e


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "tensorrt-rtx"  # tensorrt-rtx (builds on the CPU) | tensorrt (10.x / 11.x)
    optimization_level: int = 3  # builder optimization level 0-5 (3 = TensorRT's default)
    workspace_mb: int = 1024  # workspace memory pool limit
    compute_capabilities: tuple[str, ...] = ("sm80", "sm86", "sm89", "sm120")  # TensorRT-RTX targets
    timing_cache: bool = True  # full TensorRT: load/save DIR/timing.cache (a no-op in TensorRT-RTX)
    plugin_library: str | None = None  # .so loaded before parsing (custom temporal-attention node)
    version_compatible: bool = False  # full TensorRT only; embeds the plugin library when set
    detailed_profiling: bool = True  # per-layer detail in the inspector JSON


class _Logger:
    """A TensorRT logger that keeps warnings and errors for the exception message."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.WARNING:
                    self.lines.append(str(msg))

        return Logger()


def _network(trt, builder, logger, onnx_path: Path, options: BuildOptions):
    if options.plugin_library:
        if not Path(options.plugin_library).is_file():
            raise EngineError(f"{options.plugin_library}: plugin library not found")
        trt.get_plugin_registry().load_library(str(options.plugin_library))
    flags = 0
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if options.backend == "tensorrt" and typed is not None and int(trt.__version__.split(".")[0]) < 11:
        flags = 1 << int(typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not Path(onnx_path).is_file():
        raise EngineError(f"{onnx_path}: ONNX file not found")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: the {options.backend} ONNX parser refused it ({errors[:500]})")
    return network, parser


def _capabilities(trt, names: tuple[str, ...]) -> list:
    valid = {m.lower(): getattr(trt.ComputeCapability, m) for m in dir(trt.ComputeCapability) if m.startswith("SM")}
    bad = [n for n in names if n.lower() not in valid]
    if bad:
        raise EngineError(f"compute capability {', '.join(bad)} is not a TensorRT-RTX target; "
                          f"choose from {', '.join(sorted(valid))}")
    return [valid[n.lower()] for n in names]


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions,
                 timing_cache_path: str | Path | None = None, log: Callable[[str], None] | None = None,
                 shapes: dict[str, tuple] | None = None) -> dict:
    """Build and write one engine; write its layer view beside it; return a summary."""
    trt = load_backend(options.backend)
    ccs = _capabilities(trt, options.compute_capabilities) if options.backend == "tensorrt-rtx" else []
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, logger, Path(onnx_path), options)
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    notes = []
    if options.backend == "tensorrt-rtx":
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(cc, i)
        notes.append("timing cache: no-op in TensorRT-RTX, not used")
    else:
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if options.plugin_library:
                config.plugins_to_serialize = [str(options.plugin_library)]
        if options.timing_cache and timing_cache_path:
            blob = Path(timing_cache_path).read_bytes() if Path(timing_cache_path).is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        if not shapes:
            raise EngineError(f"{onnx_path}: dynamic inputs {[t.name for t in dynamic]} need shapes for a profile")
        profile = builder.create_optimization_profile()
        for t in dynamic:
            profile.set_shape(t.name, shapes[t.name], shapes[t.name], shapes[t.name])
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise EngineError(f"{onnx_path}: {options.backend} could not build an engine: "
                          + " | ".join(logger.lines[-3:]))
    plan = bytes(plan)
    engine_path = Path(engine_path)
    engine_path.write_bytes(plan)
    if options.backend == "tensorrt" and options.timing_cache and timing_cache_path:
        Path(timing_cache_path).write_bytes(bytes(config.get_timing_cache().serialize()))
    layers = engine_layers(plan, options.backend)
    view = {"source": "engine-inspector", "layers": layers} if layers is not None else {
        "source": "network (no GPU to deserialize on)", "layers": network_layers(onnx_path, options)}
    engine_path.with_name(engine_path.name.replace(".engine", ".layers.json")).write_text(json.dumps(view, indent=1))
    if log:
        log(f"  {engine_path.name}: {len(plan) / 2**20:.2f} MiB in {seconds:.1f} s")
    return {"engine_bytes": len(plan), "build_seconds": seconds, "backend": options.backend,
            "version": trt.__version__, "compute_capabilities": list(options.compute_capabilities)
            if options.backend == "tensorrt-rtx" else [], "layer_view": view["source"],
            "warnings": logger.lines[-20:] + notes}


def network_layers(onnx_path: str | Path, options: BuildOptions) -> list[dict]:
    """Each layer of the parsed network: name, type and output dtypes (works without a GPU)."""
    trt = load_backend(options.backend)
    logger = _Logger(trt)
    network, _parser = _network(trt, trt.Builder(logger), logger, Path(onnx_path), options)
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers.append({"name": layer.name, "type": str(layer.type).split(".")[-1],
                       "outputs": [str(layer.get_output_type(j)).split(".")[-1] for j in range(layer.num_outputs)]})
    return layers


def engine_layers(plan: bytes, backend: str) -> list | None:
    """The engine inspector's per-layer JSON, where a GPU can deserialize the engine; else None."""
    if not _gpu_present():
        return None
    trt = load_backend(backend)
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))  # "cannot run here" is an answer, not an error
    validity = getattr(runtime, "get_engine_validity", None)
    if validity is not None and validity(plan)[0] == trt.EngineValidity.INVALID:
        return None  # e.g. a TensorRT-RTX engine on Hopper
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception:  # no driver / unsupported GPU: the caller falls back to the network view
        return None
    if engine is None:
        return None
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return info.get("Layers", info)


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
