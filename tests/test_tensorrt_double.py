"""The TensorRT execution path (engine.engine.Engine, runtime.tensorrt.TensorRTBackend) driven
through check -> load -> set shapes -> bind -> enqueue -> capture on the CPU, against the test
double of the TensorRT Python API in tests/trt_double.py, whose names and signatures are first
checked against the installed tensorrt_rtx. What the double cannot tell: whether a real engine
computes what its ONNX graph does (the build tests in test_engine.py and test_export.py check that
TensorRT-RTX accepts and builds the graphs; nothing here runs a real engine)."""
from __future__ import annotations

import contextlib
import enum
import gc
import inspect
import re
from types import SimpleNamespace

import numpy as np
import pytest

import trt_double
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions
from mirage.core.loop import NumpyOps
from mirage.engine.engine import Engine
from mirage.engine.manifest import EngineError, read_manifest
from mirage.engine.verify import artifact_specs
from mirage.runtime import Pipeline
from mirage.runtime.tensorrt import TensorRTBackend

# ---------------------------------------------------------------------------------------------
# The double against the real API


def _split(params: str) -> list[str]:
    """Top-level comma-separated parts of a pybind11 parameter list (types nest [], (), <>)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(params):
        depth += c in "[(<" and 1 or c in "])>" and -1 or 0
        if c == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    return [p.strip() for p in parts + [params[start:]] if p.strip()]


def _overloads(fn, name: str) -> list[list[tuple[str, bool]]]:
    """Each overload's parameters (name, has a default), self left out, from a pybind11 docstring."""
    found = []
    for line in (fn.__doc__ or "").splitlines():
        line = re.sub(r"^\d+\. ", "", line.strip())
        if not line.startswith(name + "("):
            continue
        depth, end = 0, len(name)
        for end in range(len(name), len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        params = [(p.split(":")[0].split("=")[0].strip(), " = " in p) for p in _split(line[len(name) + 1:end])]
        if not params or params[0][0] != "*args":
            found.append([p for p in params if p[0] != "self"])
    return found


def _double_params(fn) -> list[tuple[str, bool]]:
    return [(p.name, p.default is not inspect.Parameter.empty)
            for p in list(inspect.signature(fn).parameters.values())[1:]]


def _compare(double, real, path: str) -> list[str]:
    problems = []
    if isinstance(double, type) and issubclass(double, enum.Enum):
        for name, member in double.__members__.items():
            if name not in real.__members__ or int(real.__members__[name]) != int(member):
                problems.append(f"{path}.{name} = {int(member)}: not so in tensorrt_rtx")
        return problems
    for name, value in vars(double).items():
        if name.startswith("_") and name != "__init__":
            continue
        where = f"{path}.{name}"
        if not hasattr(real, name):
            problems.append(f"{where}: tensorrt_rtx has no such name")
            continue
        real_value = inspect.getattr_static(real, name)
        if name == "__init__" and not (real_value.__doc__ or "").startswith("__init__(self"):
            continue  # TensorRT makes these objects itself (engines, contexts): the double's own constructor
        if isinstance(value, type):
            problems += _compare(value, getattr(real, name), where)
        elif isinstance(value, property):
            if not isinstance(real_value, property) or (value.fset is not None and real_value.fset is None):
                problems.append(f"{where}: a {'settable ' if value.fset else ''}property, not so in tensorrt_rtx")
        elif callable(value):
            if _double_params(value) not in _overloads(real_value, name):
                problems.append(f"{where}{_double_params(value)}: no such overload in tensorrt_rtx "
                                f"{_overloads(real_value, name)}")
        elif isinstance(value, enum.Enum) and int(getattr(real, name)) != int(value):
            problems.append(f"{where} = {int(value)}: not so in tensorrt_rtx")
    return problems


def test_the_double_has_the_names_and_signatures_of_the_installed_tensorrt_rtx():
    real = pytest.importorskip("tensorrt_rtx")
    problems, checked = [], 0
    for name, value in vars(trt_double).items():
        if name.startswith("_") or name in trt_double.NOT_API or getattr(value, "__module__", None) != "trt_double":
            continue
        checked += 1
        if not hasattr(real, name):
            problems.append(f"{name}: tensorrt_rtx has no such name")
        elif isinstance(value, type):
            problems += _compare(value, getattr(real, name), name)
        elif _double_params_fn(value) not in _overloads(getattr(real, name), name):
            problems.append(f"{name}: no such overload in tensorrt_rtx")
    assert checked >= 10 and not problems, "\n".join(problems)


def _double_params_fn(fn) -> list[tuple[str, bool]]:
    return [(p.name, p.default is not inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]


def test_the_signature_check_sees_a_drift():
    """The comparison above fails on a renamed parameter, a missing method and a wrong enum value."""
    real = pytest.importorskip("tensorrt_rtx")

    class IExecutionContext:
        def set_tensor_address(self, name, address):  # TensorRT calls it `memory`
            pass

        def enqueue(self, stream):  # not a TensorRT method
            pass

    class DataType(enum.IntEnum):
        HALF = 2  # 1 in TensorRT

    assert len(_compare(IExecutionContext, real.IExecutionContext, "IExecutionContext")) == 2
    assert _compare(DataType, real.DataType, "DataType") == ["DataType.HALF = 2: not so in tensorrt_rtx"]


# ---------------------------------------------------------------------------------------------
# Engine: check -> load -> set shapes -> bind -> enqueue -> capture


class HostArray(np.ndarray):
    """A host buffer with a torch-style data_ptr(): its real address, which the double reads and writes."""

    def data_ptr(self) -> int:
        return self.ctypes.data


def _zeros(spec: G.TensorSpec, batch: int | None = None) -> HostArray:
    shape = ((batch,) + spec.shape[1:]) if batch else spec.shape
    return np.zeros(shape, spec.dtype).view(HostArray)


@pytest.fixture
def rtx_artifact(onnx_artifact, tmp_path):
    return trt_double.engine_artifact(onnx_artifact, tmp_path / "rtx")


def test_engine_lifecycle(trt, rtx_artifact):
    m = read_manifest(rtx_artifact)
    _, specs = artifact_specs(m)
    spec = specs[G.CONTEXT]
    engine = Engine(rtx_artifact, m, G.CONTEXT, spec)
    engine.check(trt, "sm89", None)
    trt.CUDA["device"] = 0
    engine.load(trt, trt.Runtime(trt.Logger()))
    buffers = {x.name: _zeros(x) for x in spec.tensors}
    rng = np.random.default_rng(0)
    buffers[G.FRAME][...] = rng.standard_normal(spec.tensor(G.FRAME).shape)
    buffers[G.T_CTX][...] = 0.25
    engine.bind({n: b.data_ptr() for n, b in buffers.items()}, {n: buffers[n].shape for n in spec.input_names})
    assert engine.capturable(7)
    engine.execute(7)
    feeds = {n: np.asarray(buffers[n]) for n in (G.FRAME, G.T_CTX)}
    want = engine.engine.session.run(None, feeds)[0]
    assert np.abs(buffers[G.KV]).max() > 0 and np.array_equal(buffers[G.KV], want)
    trt.CUDA["capturing"] = 7  # enqueued during a capture: recorded, not run
    engine.execute(7)
    assert [s for s, _ in trt.CUDA["captured"]] == [7] and len(trt.CUDA["executed"]) == 1
    engine.close()
    assert engine.context is None and engine.config is None


def test_runtime_config_lives_as_long_as_the_context(trt, rtx_artifact):
    """The context's IRuntimeConfig is not kept by TensorRT: the Engine keeps it (a local freed at
    the end of load() makes the double's enqueue fail, as a use-after-free would)."""
    m = read_manifest(rtx_artifact)
    _, specs = artifact_specs(m)
    trt.CUDA["device"] = 0
    engine = Engine(rtx_artifact, m, G.CONTEXT, specs[G.CONTEXT])
    engine.load(trt, trt.Runtime(trt.Logger()))
    gc.collect()
    buffers = {x.name: _zeros(x) for x in specs[G.CONTEXT].tensors}
    engine.bind({n: b.data_ptr() for n, b in buffers.items()},
                {n: buffers[n].shape for n in specs[G.CONTEXT].input_names})
    engine.execute(3)
    assert engine.context.config() is engine.config is not None


def test_a_stale_runtime_cache_is_reported_and_replaced(trt, rtx_artifact):
    m = read_manifest(rtx_artifact)
    cache = rtx_artifact / G.runtime_cache_file(G.DENOISE)
    cache.write_bytes(b"written by another GPU")
    trt.CUDA["device"] = 0
    specs = artifact_specs(m)[1]
    with pytest.warns(UserWarning, match="runtime cache from another GPU"):
        backend = TensorRTBackend(rtx_artifact, m, specs, "cuda:0")
    backend.close()
    assert cache.read_bytes() == trt.IRuntimeCache().serialize()  # this GPU's, for the next load


def test_the_device_is_selected_before_loading_and_before_every_call(trt, rtx_artifact):
    """cuda:1: every engine and context is made with GPU 1 current, and run() makes it current
    again when another pipeline (GPU 0) ran on the thread in between."""
    m = read_manifest(rtx_artifact)
    specs = artifact_specs(m)[1]
    trt.CUDA["device"] = 0
    backend = TensorRTBackend(rtx_artifact, m, specs, "cuda:1")
    assert backend.device == "cuda:1"
    assert {(e.engine.device, e.context.device) for e in backend.engines.values()} == {(1, 1)}
    backend.use_stream(5)
    spec = specs[G.CONTEXT]
    buffers = {x.name: _zeros(x) for x in spec.tensors}
    trt.CUDA["device"] = 0  # another pipeline's GPU made current on this thread
    backend.run(G.CONTEXT, {n: buffers[n] for n in spec.input_names}, buffers[G.KV])
    assert trt.CUDA["executed"][-1][0] == 5
    assert backend.capture_refusal(5) is None
    backend.close()


def test_a_dynamic_batch_is_set_before_binding(trt, rtx_artifact):
    """set_input_shape for the batch asked for, before the addresses; a shape TensorRT refuses is named."""
    m = read_manifest(rtx_artifact)
    specs = artifact_specs(m)[1]
    assert m["max_batch"] == 2
    trt.CUDA["device"] = 0
    engine = Engine(rtx_artifact, m, G.CONTEXT, specs[G.CONTEXT])
    engine.load(trt, trt.Runtime(trt.Logger()))
    assert engine.context.get_tensor_shape(G.FRAME)[0] == -1
    buffers = {x.name: _zeros(x, batch=2) for x in specs[G.CONTEXT].tensors}
    engine.bind({n: b.data_ptr() for n, b in buffers.items()}, {G.FRAME: (2, 3, 32, 32), G.T_CTX: (2,)})
    assert engine.context.get_tensor_shape(G.FRAME) == [2, 3, 32, 32]
    engine.execute(1)
    assert np.abs(buffers[G.KV]).max() > 0
    with pytest.raises(EngineError, match=r"refused shape \(2, 4, 32, 32\) for 'frame'"):
        engine.bind({}, {G.FRAME: (2, 4, 32, 32)})


# ---------------------------------------------------------------------------------------------
# The frame loop through the TensorRT backend


class HostEvent:
    """runtime.cuda.Event's interface with nothing to wait for."""

    def record(self, stream):
        pass

    def wait(self, stream):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 0.0


class HostGpu:
    """runtime.gpu.CudaGpu's interface on host memory: buffers are HostArrays, the loop's ops
    numpy's, streams plain handles; capture() runs the body with the double's capture mode on (its
    enqueues are recorded, not run) and a replay runs the body."""

    def __init__(self, device: str):
        self.device, self.compute, self.copy_stream, self.ops = device, 11, 12, NumpyOps()

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype).view(HostArray)

    @contextlib.contextmanager
    def on_compute(self):
        yield

    def pinned(self, like):
        return np.zeros(like.shape, like.dtype)

    def event(self):
        return HostEvent()

    def synchronize(self):
        pass

    def upload(self, dst, host):
        dst[...] = host

    def download(self, host, src):
        host[...] = src

    def copy(self, dst, src):
        dst[...] = src

    def warm_up(self, body, for_capture):
        body()

    def capture(self, body):
        trt_double.CUDA["capturing"] = self.compute
        try:
            body()
        finally:
            trt_double.CUDA["capturing"] = None
        return SimpleNamespace(replay=body)

    def device_name(self):
        return "host stand-in"

    def memory_mb(self):
        return 0.0, "none (host stand-in)"

    def close(self):
        pass


def _frames(path, backend: str, device: str, n: int = 3) -> np.ndarray:
    with Pipeline.load(path, backend=backend, device=device, options=PipelineOptions(steps=2)) as pipe:
        pipe.reset(5)
        frames = np.stack([pipe.step() for _ in range(n)])
        graphs = len(pipe.graphs)
    return frames, graphs


def test_the_frame_loop_through_the_tensorrt_backend_matches_onnx_runtime(trt, rtx_artifact, onnx_artifact,
                                                                           monkeypatch):
    import mirage.runtime.gpu

    monkeypatch.setattr(mirage.runtime.gpu, "CudaGpu", HostGpu)
    want, _ = _frames(onnx_artifact, "onnxruntime", "cpu")
    got, graphs = _frames(rtx_artifact, "tensorrt", "cuda:1")
    assert graphs == 2  # both parity graphs captured
    captured = {ctx.engine for _, ctx in trt.CUDA["captured"]}
    assert len(captured) == 2 and {s for s, _ in trt.CUDA["captured"]} == {HostGpu("").compute}
    assert np.abs(got).max() > 0.1 and np.abs(got - want).max() < 1e-5


def test_an_engine_that_cannot_be_captured_runs_eagerly_with_a_warning(trt, onnx_artifact, tmp_path, monkeypatch):
    import mirage.runtime.gpu

    monkeypatch.setattr(mirage.runtime.gpu, "CudaGpu", HostGpu)
    art = trt_double.engine_artifact(onnx_artifact, tmp_path / "nocap", capturable=False)
    with pytest.warns(UserWarning, match="no CUDA graph: TensorRT says the denoise, context_encode engine"):
        got, graphs = _frames(art, "tensorrt", "cuda:0", n=2)
    want, _ = _frames(onnx_artifact, "onnxruntime", "cpu", n=2)
    assert graphs == 0 and not trt.CUDA["captured"] and np.abs(got - want).max() < 1e-5
