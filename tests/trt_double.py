"""A test double of the TensorRT Python API: the part that mirage.engine.engine.Engine and
mirage.runtime.tensorrt.TensorRTBackend call, with the class names, method names and parameters
of the real `tensorrt_rtx` module (tests/test_tensorrt_double.py checks them against the installed
one, so the double cannot drift from the API).

A "plan" here is a header line and an ONNX graph (`plan()`); the double "executes" it with ONNX
Runtime on host memory: tensor addresses are real host addresses (numpy buffers' `ctypes.data`),
read and written as TensorRT reads and writes device memory. The rules a real engine enforces and
the runtime relies on are enforced too, each a plain failure return as in TensorRT:

- an engine and its context belong to the device current when they were made (`CUDA["device"]`,
  which the tests' stub of mirage.runtime.cuda.use_device sets): enqueueing with another device
  current fails;
- a context made from an IRuntimeConfig needs that config alive (the C++ object is not kept by
  the context);
- a version-compatible plan deserializes only with Runtime.engine_host_code_allowed;
- a plugin library registers its creators once; a file that is not one registers nothing;
- a runtime cache from another environment is rejected by IRuntimeCache.deserialize;
- during a stream capture (`CUDA["capturing"]`, the stream being captured) enqueued work is
  recorded, not run.
"""
from __future__ import annotations

import ctypes
import enum
import json
import weakref

import numpy as np

import onnxruntime

__version__ = "0.0.0-double"
MAGIC = b"MIRAGE-TRT-DOUBLE-PLAN\n"
PLUGIN_MAGIC = b"MIRAGE-TRT-DOUBLE-PLUGIN"
CACHE_MAGIC = b"MIRAGE-TRT-DOUBLE-CACHE"

# The CUDA state the runtime's one CUDA seam (runtime.cuda.use_device) would change, and what ran.
CUDA: dict = {"device": None, "capturing": None, "captured": [], "executed": []}


NOT_API = ("plan", "reset", "engine_artifact")  # the double's own helpers; every other public name mirrors tensorrt_rtx


def reset() -> None:
    CUDA.update(device=None, capturing=None, captured=[], executed=[])
    _REGISTRY.clear()


def plan(onnx: bytes, version_compatible: bool = False, capturable: bool = True) -> bytes:
    """A serialized "engine" of this double: its header and the ONNX graph it runs."""
    header = {"version_compatible": version_compatible, "capturable": capturable}
    return MAGIC + json.dumps(header).encode() + b"\n" + onnx


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.INT8: np.int8, DataType.UINT8: np.uint8, DataType.BOOL: np.bool_}
_FROM_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int32)": DataType.INT32,
             "tensor(int64)": DataType.INT64}


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = ILogger.Severity

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity
        self.lines: list[str] = []

    def log(self, severity, msg):
        if severity <= self.min_severity:
            self.lines.append(str(msg))


class IPluginRegistry:
    def load_library(self, plugin_path):
        with open(plugin_path, "rb") as f:
            if not f.read().startswith(PLUGIN_MAGIC) or _REGISTRY:
                return None  # not a plugin library, or its creators are registered already
        _REGISTRY.add(("MirageTemporalAttention", "1", "mirage"))
        return object()

    def get_creator(self, type, version, plugin_namespace=""):  # noqa: A002 (TensorRT's parameter name)
        return object() if (type, version, plugin_namespace) in _REGISTRY else None


_REGISTRY: set[tuple[str, str, str]] = set()


def get_plugin_registry():
    return IPluginRegistry()


class IRuntimeCache:
    def __init__(self):
        self.blob = CACHE_MAGIC + f" cuda:{CUDA['device']}".encode()

    def deserialize(self, blob):
        if bytes(blob) != self.blob:  # another environment's cache: rejected, this one unchanged
            return False
        return True

    def serialize(self):
        return self.blob


class IRuntimeConfig:
    def __init__(self):
        self.cache = None

    def create_runtime_cache(self):
        return IRuntimeCache()

    def set_runtime_cache(self, cache=None):
        self.cache = cache
        return True


class ICudaEngine:
    def __init__(self, header: dict, onnx: bytes):
        self.session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.device, self.capturable = CUDA["device"], header["capturable"]
        self.tensors = {x.name: (TensorIOMode.INPUT, x) for x in self.session.get_inputs()}
        self.tensors.update({x.name: (TensorIOMode.OUTPUT, x) for x in self.session.get_outputs()})

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, index):
        return list(self.tensors)[index]

    def get_tensor_mode(self, name):
        return self.tensors[name][0] if name in self.tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return _FROM_ORT[self.tensors[name][1].type]

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self.tensors[name][1].shape]

    def create_runtime_config(self):
        return IRuntimeConfig()

    def create_execution_context(self, runtime_config=None):
        return IExecutionContext(self, runtime_config)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, config: IRuntimeConfig | None):
        self.engine, self.device = engine, CUDA["device"]
        self.config = weakref.ref(config) if config is not None else None
        self.shapes = {n: engine.get_tensor_shape(n) for n in engine.tensors}
        self.addresses: dict[str, int] = {}

    @property
    def all_binding_shapes_specified(self):
        return all(-1 not in self.shapes[n] for n, (m, _) in self.engine.tensors.items() if m == TensorIOMode.INPUT)

    def get_tensor_shape(self, name):
        return list(self.shapes[name])

    def set_input_shape(self, name, shape):
        declared = self.engine.get_tensor_shape(name)
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT or len(shape) != len(declared) \
                or any(d not in (-1, s) for d, s in zip(declared, shape)):
            return False
        self.shapes[name] = list(shape)
        return True

    def set_tensor_address(self, name, memory):
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = int(memory)
        return True

    def is_stream_capturable(self, stream):
        return self.engine.capturable

    def execute_async_v3(self, stream_handle):
        if CUDA["device"] != self.device or (self.config is not None and self.config() is None):
            return False  # another GPU's context, or its runtime config freed
        if set(self.addresses) != set(self.engine.tensors) or not self.all_binding_shapes_specified:
            return False
        if CUDA["capturing"] == stream_handle:
            CUDA["captured"].append((stream_handle, self))
            return True
        CUDA["executed"].append((stream_handle, self))
        feeds = {n: self._view(n, self.shapes[n]) for n, (m, _) in self.engine.tensors.items()
                 if m == TensorIOMode.INPUT}
        names = [x.name for x in self.engine.session.get_outputs()]
        for name, value in zip(names, self.engine.session.run(names, {n: v.copy() for n, v in feeds.items()})):
            self._view(name, value.shape)[...] = value
        return True

    def _view(self, name: str, shape) -> np.ndarray:
        dtype = np.dtype(_NUMPY[self.engine.get_tensor_dtype(name)])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_byte * nbytes).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Runtime:
    def __init__(self, logger):
        self.logger = logger
        self._host_code = False

    @property
    def engine_host_code_allowed(self):
        return self._host_code

    @engine_host_code_allowed.setter
    def engine_host_code_allowed(self, value):
        self._host_code = bool(value)

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "the plan is not an engine")
            return None
        header, onnx = data[len(MAGIC):].split(b"\n", 1)
        header = json.loads(header)
        if header["version_compatible"] and not self._host_code:
            self.logger.log(ILogger.Severity.ERROR, "version-compatible plan, but engine host code is not allowed")
            return None
        return ICudaEngine(header, onnx)


def engine_artifact(onnx_artifact, out, backend: str = "tensorrt-rtx", targets=("sm89",), build_options=None,
                    **plan_flags):
    """A copy of an ONNX-only artifact with this double's plans as its engines, and the manifest a
    TensorRT export would write for them."""
    import shutil
    from pathlib import Path

    from mirage.core.files import sha256_file
    from mirage.engine.manifest import write_manifest

    out = Path(out)
    shutil.copytree(onnx_artifact, out)
    m = json.loads((out / "manifest.json").read_text())
    for graph, meta in m["graphs"].items():
        engine = out / f"{graph}.engine"
        engine.write_bytes(plan((out / meta["onnx"]).read_bytes(), **plan_flags))
        meta.update(engine=engine.name, engine_sha256=sha256_file(engine))
    m.update(backend={"name": backend, "version": __version__}, target={"compute_capabilities": list(targets)},
             build_options=build_options or {})
    write_manifest(out, m)
    return out
