"""Build TensorRT / TensorRT-RTX engines from ONNX: strongly typed networks only.

TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrator: a graph's precision
is what its ONNX says (fp16 tensors, Q/DQ nodes). TensorRT 10.x gets the STRONGLY_TYPED
network flag; TensorRT 11.x and TensorRT-RTX networks are always strongly typed.

TensorRT-RTX builds ahead of time on a machine without a GPU, for the compute capabilities
it is given. It has no sm90: it does not run on Hopper. Its timing cache is a no-op, so only
full TensorRT keeps DIR/timing.cache. Without a GPU an engine cannot be deserialized, so
the per-layer view written beside each engine then comes from the parsed network instead of
the engine inspector.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mirage.core.device import sm_name
from mirage.core.graphs import layers_file
from mirage.engine.manifest import EngineError

# backend name -> (Python module, pyproject extra that installs it)
MODULES = {"tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx"), "tensorrt": ("tensorrt", "tensorrt")}

INSPECTOR_VIEW = "engine-inspector"
NETWORK_VIEW = "network (no GPU to deserialize on)"
REFUSED_VIEW = "network (this GPU cannot deserialize the engine)"


def load_backend(name: str):
    """The imported TensorRT module for a backend name."""
    if name not in MODULES:
        raise EngineError(f"backend {name!r}: choose one of {', '.join(MODULES)}")
    module, extra = MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineError(f"{name} is not installed: pip install -e \".[{extra}]\"") from e


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "tensorrt-rtx"  # tensorrt-rtx (builds on the CPU) | tensorrt (10.x / 11.x, needs its GPU)
    optimization_level: int = 3  # builder optimization level 0-5 (3 = TensorRT's own default)
    workspace_mb: int = 1024  # workspace memory pool limit; TensorRT-RTX's default is the whole host (64 GiB read back)
    # TensorRT-RTX targets (ignored by full TensorRT, which builds for the GPU it runs on). These four
    # are what RTX covers by default; listing them keeps the manifest explicit. () = the library default.
    compute_capabilities: tuple[str, ...] = ("sm80", "sm86", "sm89", "sm120")
    timing_cache: bool = True  # full TensorRT: load/save DIR/timing.cache (TensorRT-RTX: a no-op, skipped)
    plugin_library: str | None = None  # .so loaded before parsing (custom temporal-attention node)
    version_compatible: bool = False  # full TensorRT only; embeds the plugin library when set
    detailed_profiling: bool = True  # per-layer precisions and tactics in the inspector JSON

    def __post_init__(self):
        if self.backend not in MODULES:
            raise EngineError(f"backend {self.backend!r}: choose one of {', '.join(MODULES)}")
        if not 0 <= self.optimization_level <= 5:
            raise EngineError(f"optimization level {self.optimization_level}: choose 0-5")
        if self.workspace_mb <= 0:
            raise EngineError(f"workspace {self.workspace_mb} MB: must be positive")
        if isinstance(self.compute_capabilities, str):  # "sm89" would iterate as "s", "m", ...
            raise EngineError(f"compute_capabilities={self.compute_capabilities!r}: give a tuple, e.g. ('sm89',)")
        if self.version_compatible and self.backend == "tensorrt-rtx":
            # verified: the build fails with "Unable to load library: libnvinfer_lean.so.1"
            raise EngineError("version_compatible needs full TensorRT; TensorRT-RTX cannot build such engines")


# ---------------------------------------------------------------------------------------------
# Logging: one logger per backend module, for the whole process

_LOGGERS: dict[str, object] = {}


def _logger(trt):
    """The process-wide logger for `trt`, which keeps the warnings and errors of the current build.

    TensorRT has one logger per process: a Builder created with a different one while another
    builder or runtime is alive logs "the current new logger is ignored" and keeps the first
    (seen with TensorRT-RTX 1.7.1), so a logger per build would miss lines.
    """
    if trt.__name__ not in _LOGGERS:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[tuple[str, str]] = []  # (severity name, message) since begin()

            def begin(self) -> list[tuple[str, str]]:
                self.lines = []
                return self.lines

            def log(self, severity, msg):
                # severities count up from INTERNAL_ERROR = 0: this keeps errors and warnings
                if severity <= trt.ILogger.Severity.WARNING:
                    self.lines.append((severity.name, " ".join(str(msg).split())))

        _LOGGERS[trt.__name__] = Logger()
    return _LOGGERS[trt.__name__]


def _errors(lines: list[tuple[str, str]], last: int = 3) -> str:
    errors = [m for s, m in lines if s != "WARNING"] or [m for _, m in lines]
    return " | ".join(errors[-last:]) or "(no log lines captured; see the TensorRT log above)"


# ---------------------------------------------------------------------------------------------
# ONNX -> network

_PLUGINS: dict[str, bool] = {}  # library -> whether its load registered anything (a second load returns None)


def load_plugin(trt, path: str | Path) -> bool:
    """Register a plugin library's creators, once per process; the ONNX parser and the engine
    deserializer look custom layers up there. False where TensorRT loaded nothing: `path` is not a
    TensorRT plugin library, or its plugins were already registered by another load."""
    lib = Path(path)
    if not lib.is_file():
        raise EngineError(f"{path}: plugin library not found; build plugins_cpp/ or fix --plugin-library")
    key = str(lib.resolve())
    if key not in _PLUGINS:
        # verified: None both for "already registered" and for a file that is not a library at all
        _PLUGINS[key] = trt.get_plugin_registry().load_library(key) is not None
    return _PLUGINS[key]


def _load_plugin(trt, path: str | None, warnings: list[str]) -> None:
    if path and not load_plugin(trt, path):  # not an error here: a node that needs the plugin then fails to parse
        warnings.append(f"load_library({Path(path).resolve()}) returned None: not a TensorRT plugin library, "
                        "or its plugins were already registered")


def _network_flags(trt, backend: str) -> int:
    # TensorRT 10.x: strongly typed only with the flag (else the FP16/INT8 builder flags decide).
    # TensorRT 11.x and TensorRT-RTX: always strongly typed; the flag is deprecated and ignored.
    if backend == "tensorrt" and int(trt.__version__.split(".")[0]) < 11:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise EngineError(f"TensorRT {trt.__version__} has no strongly typed networks: "
                              "pip install -e \".[tensorrt]\" (10.14 or newer)")
        return 1 << int(flag)
    return 0


def _parse(trt, builder, logger, onnx_path: Path, options: BuildOptions, warnings: list[str]):
    """A network parsed from ONNX (the plugin library loaded first); the parser stays alive with it."""
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: ONNX file not found")
    _load_plugin(trt, options.plugin_library, warnings)
    network = builder.create_network(_network_flags(trt, options.backend))
    parser = trt.OnnxParser(network, logger)
    # from a file, not bytes: external-data side files are found next to it
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: the {options.backend} ONNX parser refused it ({errors[:800]})")
    return network, parser


def _layer_table(network) -> list[dict]:
    """Each layer's name, type and output dtypes: what can be inspected without a GPU."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers.append({"name": layer.name, "type": layer.type.name,
                       "outputs": [layer.get_output_type(j).name for j in range(layer.num_outputs)]})
    return layers


def network_layers(onnx_path: str | Path, options: BuildOptions = BuildOptions()) -> list[dict]:
    """Parse the ONNX (no build) and list its layers; works without a GPU."""
    trt = load_backend(options.backend)
    logger = _logger(trt)
    logger.begin()
    network, _parser = _parse(trt, trt.Builder(logger), logger, Path(onnx_path), options, [])
    return _layer_table(network)


# ---------------------------------------------------------------------------------------------
# Builder configuration


def _capabilities(trt, names: tuple[str, ...]) -> list:
    """TensorRT-RTX ComputeCapability members for names like 'sm89' (1.7.1: sm75 sm80 sm86 sm89 sm120 sm121)."""
    valid = {m.lower(): v for m, v in trt.ComputeCapability.__members__.items() if m.startswith("SM")}
    wanted = [n.lower().replace("_", "") for n in names]
    bad = [n for n, w in zip(names, wanted) if w not in valid]
    if bad:
        hopper = " (TensorRT-RTX does not run on Hopper; use --backend tensorrt)" if "sm90" in wanted else ""
        raise EngineError(f"compute capability {', '.join(bad)} is not a TensorRT-RTX target{hopper}; "
                          f"choose from {', '.join(sorted(valid, key=lambda s: int(s[2:])))}")
    return [valid[w] for w in wanted]


def _configure(trt, builder, options: BuildOptions, ccs: list, timing_cache_path: Path | None,
               warnings: list[str]):
    """The builder config, and how the timing cache was handled (for the summary)."""
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.backend == "tensorrt-rtx":
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            if not config.set_compute_capability(cc, i):
                raise EngineError(f"TensorRT-RTX refused compute capability {options.compute_capabilities[i]}")
        # "required when using CUDA stream capture" (TensorRT-RTX 1.2 release notes): the context
        # then allocates nothing at enqueue, and the runtime captures every frame in one CUDA graph
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
        # "Timing cache operations are no-ops in TensorRT-RTX" (and deprecated): not touched
        return config, "not used (a no-op in TensorRT-RTX)"
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if options.plugin_library:  # embedded in the plan, so the runtime needs no .so
            config.plugins_to_serialize = [str(Path(options.plugin_library).resolve())]
    if not (options.timing_cache and timing_cache_path):
        return config, "off"
    blob = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except (RuntimeError, TypeError, ValueError):  # not run here (no full TensorRT): None or a raise
        cache = None
    if cache is None:  # an unreadable cache only costs build time: start a new one
        warnings.append(f"{timing_cache_path}: unreadable timing cache, started a new one")
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config, f"{timing_cache_path} ({'loaded' if blob else 'new'})"


def _profile(builder, config, network, shapes: dict[str, tuple] | None, onnx_path: Path) -> list[str]:
    """An optimization profile for inputs with dynamic dims: shapes[name] is one shape
    (min = opt = max) or a (min, opt, max) triple of shapes."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if not dynamic:
        return []  # static shapes: TensorRT needs no profile
    shapes = shapes or {}
    missing = [t.name for t in dynamic if t.name not in shapes]
    if missing:
        raise EngineError(f"{onnx_path}: inputs {', '.join(missing)} have dynamic dims; "
                          f"pass shapes={{name: shape}} for them")
    profile = builder.create_optimization_profile()
    for t in dynamic:
        declared, given = tuple(t.shape), tuple(shapes[t.name])
        triple = given if given and isinstance(given[0], (tuple, list)) else (given, given, given)
        triple = tuple(tuple(int(d) for d in shape) for shape in triple)
        for shape in triple:
            if len(shape) != len(declared) or any(d != -1 and d != s for d, s in zip(declared, shape)):
                raise EngineError(f"{onnx_path}: shape {shape} for {t.name!r} does not fit its ONNX shape {declared}")
        profile.set_shape(t.name, *triple)
    config.add_optimization_profile(profile)
    return [t.name for t in dynamic]


# ---------------------------------------------------------------------------------------------
# Build


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions = BuildOptions(),
                 timing_cache_path: str | Path | None = None, log: Callable[[str], None] | None = None,
                 shapes: dict[str, tuple] | None = None) -> dict:
    """Build and write one engine, write its layer view beside it (<graph>.layers.json), return a summary."""
    say = log or (lambda message: None)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = load_backend(options.backend)
    logger = _logger(trt)
    # the options first: a wrong target should not wait for a large graph to parse
    ccs = _capabilities(trt, options.compute_capabilities) if options.backend == "tensorrt-rtx" else []
    lines, warnings = logger.begin(), []
    builder = trt.Builder(logger)  # works without a GPU (TensorRT-RTX)

    say(f"  parse {onnx_path.name} ({options.backend} {trt.__version__})")
    network, _parser = _parse(trt, builder, logger, onnx_path, options, warnings)
    config, timing = _configure(trt, builder, options, ccs, Path(timing_cache_path) if timing_cache_path else None,
                                warnings)
    dynamic = _profile(builder, config, network, shapes, onnx_path)

    if options.backend == "tensorrt-rtx":
        targets = list(options.compute_capabilities)  # [] = the library's default set
    else:  # full TensorRT: an engine is for the GPU it is built on
        targets = [c for c in [sm_name()] if c]
    say(f"  build {engine_path.name} for {', '.join(targets) or 'the default targets'}")
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise EngineError(f"{onnx_path}: {options.backend} {trt.__version__} could not build an engine: "
                          f"{_errors(lines)}")
    plan = bytes(plan)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(plan)
    if options.backend == "tensorrt" and options.timing_cache and timing_cache_path:
        Path(timing_cache_path).write_bytes(bytes(config.get_timing_cache().serialize()))

    layers = engine_layers(plan, options.backend)
    source = INSPECTOR_VIEW if layers is not None else REFUSED_VIEW if sm_name() else NETWORK_VIEW
    view = {"source": source, "layers": layers if layers is not None else _layer_table(network)}
    view_path = engine_path.with_name(layers_file(engine_path.stem))
    view_path.write_text(json.dumps(view, indent=1))
    say(f"  wrote {engine_path.name}: {len(plan) / 2**20:.2f} MiB in {seconds:.1f} s; layers from {source}")

    warnings += [m for s, m in lines if s == "WARNING"]
    return {"engine_bytes": len(plan), "build_seconds": seconds,
            "backend": options.backend, "version": trt.__version__,
            "compute_capabilities": targets,
            "dynamic_inputs": dynamic, "timing_cache": timing, "plugin": options.plugin_library,
            "layers": view_path.name, "layer_view": source, "warnings": warnings[-20:]}


# ---------------------------------------------------------------------------------------------
# Engine inspection (needs a GPU that can run the engine)


def engine_layers(engine_bytes: bytes, backend: str) -> list | None:
    """The engine inspector's per-layer JSON where this machine's GPU can deserialize the engine; else None."""
    if sm_name() is None:
        return None  # without a driver, TensorRT-RTX logs a fatal-looking CUDA error and returns None
    trt = load_backend(backend)
    runtime = trt.Runtime(_logger(trt))
    validity = getattr(runtime, "get_engine_validity", None)  # TensorRT-RTX: reads only the plan header
    if validity is not None and validity(engine_bytes)[0] == trt.EngineValidity.INVALID:
        return None  # e.g. a TensorRT-RTX engine on Hopper (UNSUPPORTED_CC)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        return None
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return info.get("Layers", []) if isinstance(info, dict) else info
