"""Polygraphy comparison of a built engine against ONNX Runtime, where the engine can run.

Polygraphy's TrtRunner drives full TensorRT (`tensorrt`) on a GPU. Where that cannot happen
(no GPU, a TensorRT-RTX engine, or TensorRT-RTX on Hopper) the comparison is skipped and the
reason is recorded in the manifest instead of a result.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mirage.core.tolerances import ENGINE



def skip_reason(backend: str) -> str | None:
    """Why TensorRT cannot execute here, or None when it can."""
    if backend != "tensorrt":
        return ("Polygraphy's TrtRunner drives full TensorRT; TensorRT-RTX engines are checked by the build only "
                "(and do not run on Hopper GPUs)")
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError as e:
        return f"cannot execute TensorRT here ({e.name} is not installed)"
    if not torch.cuda.is_available():
        return "cannot execute TensorRT here (no CUDA GPU)"
    return None


def compare_engine(onnx_path: Path, engine_path: Path, feeds: list[dict[str, np.ndarray]], precision: str) -> dict:
    """Run both on the same recorded inputs; report pass/fail and the worst errors per output."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from mirage.core.ort import ort_session
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    rtol, atol = ENGINE[precision]
    runners = [OnnxrtRunner(ort_session(onnx_path)),
               TrtRunner(EngineFromBytes(Path(engine_path).read_bytes()))]
    results = Comparator.run(runners, data_loader=feeds)
    passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=rtol, atol=atol)))
    ort_out, trt_out = results[0][1][0], results[1][1][0]  # RunResults: [(runner name, [per-iteration outputs])]
    worst = {name: float(np.abs(np.asarray(trt_out[name], np.float32) - np.asarray(ort_out[name], np.float32)).max())
             for name in ort_out.keys()}
    return {"passed": passed, "rtol": rtol, "atol": atol, "max_abs_first_iteration": worst, "iterations": len(feeds)}
