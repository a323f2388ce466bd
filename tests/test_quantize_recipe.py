"""The INT8 recipe: sensitive layers stay fp16, residual Add/Mul get no Q/DQ, the rest is INT8."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("modelopt.onnx.quantization", reason="INT8 needs NVIDIA ModelOpt (pip install -e .[quantize])")

import onnx  # noqa: E402
import numpy as np  # noqa: E402

from conftest import randomized_tiny  # noqa: E402

from mirage.core import graphs as G  # noqa: E402
from mirage.core.ort import ort_session  # noqa: E402
from mirage.export.onnx_export import ExportOptions, export_graph, record_rollout_inputs  # noqa: E402
from mirage.export.quantize import int8_sensitive_nodes, quantize_qdq  # noqa: E402

SENSITIVE = re.compile(r"model\.(in_conv|out\.\d+|up\.2\.\S+)\.weight")  # tiny has 3 levels: up.2 is full resolution


def _weight_of(node, weights):
    return next((name for name in node.input if name in weights), None)


@pytest.fixture(scope="module")
def int8_denoise(tmp_path_factory):
    model = randomized_tiny("generate")  # every branch live, so every layer matters
    tmp = tmp_path_factory.mktemp("int8")
    fp32 = export_graph(model, G.DENOISE, tmp / "fp32.onnx", ExportOptions("fp32", 1, None, decompose_attention=False))
    calib = record_rollout_inputs(model, 1, seed=0)[G.DENOISE]
    return fp32, quantize_qdq(fp32, tmp / "int8.onnx", calib, "int8"), calib


def test_sensitive_nodes_are_the_input_output_and_full_resolution_decoder(int8_denoise):
    fp32, _, _ = int8_denoise
    graph = onnx.load(str(fp32), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    expected = {n.name for n in graph.node if (w := _weight_of(n, weights)) and SENSITIVE.fullmatch(w)}
    got = {p[1:-1].replace("\\", "") for p in int8_sensitive_nodes(fp32)}
    assert got == expected
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs[0].name in got and convs[-1].name in got  # first and last convolution
    assert 0 < sum(n.name in got for n in convs) < len(convs) / 2


def test_int8_graph_quantizes_only_what_tolerates_it(int8_denoise):
    fp32, int8, calib = int8_denoise
    sensitive = {p[1:-1].replace("\\", "") for p in int8_sensitive_nodes(fp32)}
    graph = onnx.load(str(int8)).graph
    producer = {out: n for n in graph.node for out in n.output}

    def dequantized_inputs(node):
        return [i for i in node.input if i in producer and producer[i].op_type == "DequantizeLinear"]

    quantized = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and dequantized_inputs(n)}
    assert quantized and not quantized & sensitive
    assert sum(n.op_type == "Conv" for n in graph.node if n.name in quantized) >= 15
    adds = [n for n in graph.node if n.op_type in ("Add", "Mul") and dequantized_inputs(n)]
    assert not adds, [n.name for n in adds]
    session = ort_session(int8)  # and ONNX Runtime runs it (with the session options every backend uses)
    feed = {k: v.numpy().astype(np.int32 if k == G.AGES else np.float32) for k, v in calib[0].items()}
    assert np.isfinite(session.run(None, feed)[0]).all()
