"""ONNX Runtime as a backend of the frame loop (numpy buffers, CPU EP): torch-free, so an
exported artifact runs, and its parity is checked, without PyTorch."""
from __future__ import annotations

from pathlib import Path

from mirage.core.errors import BackendError

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}


def ort_session(path: Path, providers: list[str] | None = None):
    """An ONNX Runtime session of one graph file, with the workaround every Mirage graph needs."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("the onnxruntime backend needs `pip install onnxruntime`") from e
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


class OrtBackend:
    """ONNX Runtime on numpy buffers (CPU EP: the no-GPU default)."""

    device = "cpu"

    def __init__(self, files: dict[str, Path], providers: list[str] | None = None):
        self.sessions = {g: ort_session(f, providers) for g, f in files.items()}
        self.io = {g: {x.name: ORT_DTYPES.get(x.type, x.type) for x in s.get_inputs() + s.get_outputs()}
                   for g, s in self.sessions.items()}

    def signature(self, graph: str) -> tuple[list[dict], list[dict]]:
        """(inputs, outputs) of the loaded graph as {name, shape, dtype} (-1 for a dynamic dim)."""
        s = self.sessions[graph]

        def desc(xs):
            return [{"name": x.name, "dtype": ORT_DTYPES.get(x.type, x.type),
                     "shape": [d if isinstance(d, int) else -1 for d in x.shape]} for x in xs]

        return desc(s.get_inputs()), desc(s.get_outputs())

    def buffer_dtype(self, graph: str, name: str) -> str:
        return self.io[graph][name]

    def use_stream(self, stream) -> None:
        raise BackendError("the onnxruntime backend runs on the CPU; it has no CUDA stream")

    def run(self, graph, inputs, output):
        session = self.sessions[graph]
        outputs = output if isinstance(output, dict) else {session.get_outputs()[0].name: output}
        for buf, value in zip(outputs.values(), session.run(list(outputs), inputs)):
            buf[...] = value

    def close(self):
        self.sessions.clear()
