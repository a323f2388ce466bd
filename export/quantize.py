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

INT8 quantizes only what tolerates it. ModelOpt's default placement (every Conv, Gemm, MatMul
and the residual Add/Mul; weights per channel, activations per tensor) cost the tiny
video-to-video model 10.2 dB of task PSNR over 50 frames (v rel. error 0.22); 32 calibration
frames instead of 8, or entropy calibration, changed that by under 0.6 dB. A per-layer sensitivity sweep (fake-quantizing one
layer at a time in PyTorch) put nearly all of the error in the input convolution, the output
convolution and the full-resolution decoder level (its skip 1x1 convolutions see inputs up to
|52|, 5-10x the other layers'), and the Q/DQ ModelOpt puts on residual Adds/Muls cost another
2.4 dB. So: those layers stay fp16 and Add/Mul get no Q/DQ; every other convolution, GEMM and
attention MatMul is INT8: 72% of the convolution/linear FLOPs of tiny's denoiser. Measured
-0.25 dB task PSNR over 50 frames (v rel. error 0.021); table in README.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import torch

from mirage.core.errors import MirageError

CALIBRATION_METHOD = "max"  # "entropy" is ModelOpt's default; on these small graphs max gave equal PSNR, faster


class QuantizeError(MirageError, RuntimeError):
    """ModelOpt is missing or failed; the message says what to install or which graph failed."""


MODES = ("int8", "fp8")
INT8_UNQUANTIZED_OPS = ["Add", "Mul"]  # see the module docstring: residual Adds are sensitive, and cheap anyway


def int8_sensitive_nodes(onnx_path: str | Path) -> list[str]:
    """Nodes INT8 keeps in fp16: those whose weights belong to the input convolution, the output
    head or the last (full-resolution) decoder level, found by the weights' PyTorch names.
    Returned as anchored patterns, since ModelOpt matches its exclusions as regex prefixes."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    up_levels = [int(m.group(1)) for w in weights if (m := re.match(r"model\.up\.(\d+)\.", w))]
    sensitive = [r"model\.in_conv\.", r"model\.out\."] + ([rf"model\.up\.{max(up_levels)}\."] if up_levels else [])
    return [f"^{re.escape(node.name)}$" for node in graph.node
            if any(re.match(p, name) for name in node.input if name in weights for p in sensitive)]


def shipped_recipe(fp32_onnx: str | Path, mode: str) -> dict:
    """The ModelOpt exclusions mirage-export ships: INT8 keeps the sensitive nodes and the
    residual Adds/Muls in fp16 (module docstring); FP8 quantizes everything it can."""
    return ({"nodes_to_exclude": int8_sensitive_nodes(fp32_onnx), "op_types_to_exclude": list(INT8_UNQUANTIZED_OPS)}
            if mode == "int8" else {})


def quantize_qdq(fp32_onnx: str | Path, out_onnx: str | Path, calibration: list[dict[str, torch.Tensor]],
                 mode: str = "int8", high_precision_dtype: str = "fp16", calibration_method: str = CALIBRATION_METHOD,
                 recipe: dict | None = None) -> Path:
    """Write an INT8 or FP8 (`mode`) Q/DQ version of `fp32_onnx`, calibrated on the given input
    dicts (batch 1 each). `recipe`: ModelOpt's node/op selection options (default: shipped_recipe;
    scripts/int8_recipes.py compares others)."""
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
    recipe = shipped_recipe(fp32_onnx, mode) if recipe is None else recipe
    try:
        with contextlib.redirect_stdout(sink):
            quantize(onnx_path=str(fp32_onnx), quantize_mode=mode, calibration_data=data,
                     calibration_method=calibration_method, calibration_eps=["cpu"], output_path=str(out_onnx),
                     high_precision_dtype=high_precision_dtype, log_level="ERROR", **recipe)
    except Exception as e:  # ModelOpt raises many types; all mean "no quantized graph"
        raise QuantizeError(f"{Path(fp32_onnx).name}: ModelOpt {mode.upper()} quantization failed ({type(e).__name__}: {e})") from e
    if not Path(out_onnx).is_file():
        raise QuantizeError(f"{Path(fp32_onnx).name}: ModelOpt wrote no output; its log:\n{sink.getvalue()[-2000:]}")
    return Path(out_onnx)
