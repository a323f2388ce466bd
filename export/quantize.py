"""8-bit precisions with explicit Q/DQ nodes, calibrated on inputs recorded from real rollouts.

NVIDIA ModelOpt's ONNX post-training quantization inserts QuantizeLinear/DequantizeLinear
pairs where TensorRT fuses them into 8-bit kernels (convolutions, GEMMs):

* int8: symmetric INT8, any TensorRT GPU;
* fp8: FP8 E4M3 (per-tensor scales), TensorRT on Ada, Hopper and Blackwell. Its 3-bit
  mantissa with an exponent keeps the small values v depends on at low noise levels, which
  INT8's uniform grid (scaled to the largest activation) rounds away.

It runs on the CPU with plain onnxruntime, which also runs both kinds of Q/DQ graph. Its `high_precision_dtype` defaults to fp16: everything it does not
quantize (norms, attention, the timestep MLP) becomes fp16, which is what a TensorRT INT8
engine would run anyway, and which lets `Attention` build (TensorRT-RTX has no fp32 kernel
for it). The graph's inputs and outputs stay fp32.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from mirage.core.errors import MirageError

CALIBRATION_METHOD = "max"  # "entropy" is ModelOpt's default; on these small graphs max gave equal PSNR, faster


class QuantizeError(MirageError, RuntimeError):
    """ModelOpt is missing or failed; the message says what to install or which graph failed."""


MODES = ("int8", "fp8")


def quantize_qdq(fp32_onnx: str | Path, out_onnx: str | Path, calibration: list[dict[str, torch.Tensor]],
                 mode: str = "int8", high_precision_dtype: str = "fp16") -> Path:
    """Write an INT8 or FP8 (`mode`) Q/DQ version of `fp32_onnx`, calibrated on the given input
    dicts (batch 1 each)."""
    if mode not in MODES:
        raise QuantizeError(f"quantization mode {mode!r}: choose one of {', '.join(MODES)}")
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise QuantizeError(f"{mode.upper()} needs NVIDIA ModelOpt: pip install -e \".[quantize]\"") from e
    data = {name: np.concatenate([c[name].numpy() for c in calibration]) for name in calibration[0]}
    for noisy in ("modelopt", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            quantize(onnx_path=str(fp32_onnx), quantize_mode=mode, calibration_data=data,
                     calibration_method=CALIBRATION_METHOD, calibration_eps=["cpu"], output_path=str(out_onnx),
                     high_precision_dtype=high_precision_dtype, log_level="ERROR")
    except Exception as e:  # ModelOpt raises many types; all mean "no quantized graph"
        raise QuantizeError(f"{Path(fp32_onnx).name}: ModelOpt {mode.upper()} quantization failed ({type(e).__name__}: {e})") from e
    if not Path(out_onnx).is_file():
        raise QuantizeError(f"{Path(fp32_onnx).name}: ModelOpt wrote no output; its log:\n{sink.getvalue()[-2000:]}")
    return Path(out_onnx)
