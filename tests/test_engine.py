"""The engine builder and the manifest checks, with real TensorRT-RTX builds on the CPU.

Models are a few nodes made with onnx.helper, so every build takes a fraction of a second.
Engines cannot be run here (no GPU): what is checked is that TensorRT-RTX accepts and builds
them, what the parsed network looks like, and every refusal a user can run into.
"""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX builds the engines: pip install -e \".[tensorrt-rtx]\"")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mirage.core.device import sm_name
from mirage.engine.build import (NETWORK_VIEW, BuildOptions, build_engine, engine_layers,  # noqa: E402
                                 load_backend, network_layers)
from mirage.engine.verify import SIDECAR, verify_file  # noqa: E402
from mirage.engine.manifest import (EngineError, check_loadable, read_manifest,  # noqa: E402
                                    sha256_file, validate_manifest, write_manifest)
from mirage.core import graphs as G  # noqa: E402

SM89 = BuildOptions(compute_capabilities=("sm89",))  # one target: the fastest build


# ---------------------------------------------------------------------------------------------
# Small ONNX models


def _save(nodes, inputs, outputs, inits, path, opset):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_relu(path, qdq=False, batch=1):
    """Conv + Relu in fp32; with qdq, INT8 Q/DQ on the activation (per tensor) and weight (per channel)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(8, np.float32), "B")]
    nodes, x, w = [], "x", "W"
    if qdq:  # TensorRT wants symmetric quantization: zero points 0
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz"),
                  numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(8, np.int8), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"]),
                  helper.make_node("QuantizeLinear", ["W", "ws", "wz"], ["wq"], axis=0),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], axis=0)]
        x, w = "xdq", "wdq"
    nodes += [helper.make_node("Conv", [x, w, "B"], ["c"], pads=[1, 1, 1, 1], name="conv0"),
              helper.make_node("Relu", ["c"], ["y"], name="relu0")]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 16, 16])], inits, path, 17)


def attention(path, dtype=TensorProto.FLOAT16, shape=(1, 2, 16, 32)):
    """One opset-23 Attention node on (batch, heads, tokens, head dim) Q/K/V.

    TensorRT-RTX 1.7.1 builds it in fp16 only, and (found here) not with batch x heads == 1
    or head dim 8: those fail "not supported by a dedicated kernel", like fp32 does.
    """
    ios = [helper.make_tensor_value_info(n, dtype, shape) for n in ("q", "k", "v")]
    return _save([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")], ios,
                 [helper.make_tensor_value_info("y", dtype, shape)], [], path, 23)


@pytest.fixture(scope="module")
def conv_engine(tmp_path_factory):
    """A Conv+Relu engine built with the default options (four compute capabilities)."""
    folder = tmp_path_factory.mktemp("conv")
    messages = []
    summary = build_engine(conv_relu(folder / "denoise.onnx"), folder / "denoise.engine", BuildOptions(),
                           timing_cache_path=folder / G.TIMING_CACHE, log=messages.append)
    return folder, summary, messages


# ---------------------------------------------------------------------------------------------
# Builds


def test_conv_engine_is_written_with_its_summary_and_layer_view(conv_engine):
    folder, summary, messages = conv_engine
    engine = folder / "denoise.engine"
    assert engine.stat().st_size == summary["engine_bytes"] > 10_000
    assert summary["backend"] == "tensorrt-rtx" and summary["version"] == trt.__version__
    assert summary["compute_capabilities"] == ["sm80", "sm86", "sm89", "sm120"]
    assert summary["build_seconds"] > 0 and isinstance(summary["warnings"], list)
    assert "no-op" in summary["timing_cache"] and not (folder / G.TIMING_CACHE).exists()
    assert any(m.strip().startswith("build denoise.engine") for m in messages), messages
    view = json.loads((folder / G.layers_file("denoise")).read_text())
    assert summary["layers"] == G.layers_file("denoise") and view["source"] == summary["layer_view"]
    if sm_name() is None:
        assert view["source"] == NETWORK_VIEW
        assert engine_layers(engine.read_bytes(), "tensorrt-rtx") is None
        assert {"CONVOLUTION", "ACTIVATION"} <= {layer["type"] for layer in view["layers"]}


def test_int8_qdq_network_and_build(tmp_path):
    path = conv_relu(tmp_path / "q.onnx", qdq=True)
    layers = network_layers(path, SM89)
    by_type = {}
    for layer in layers:
        by_type.setdefault(layer["type"], []).extend(layer["outputs"])
    assert "INT8" in by_type["QUANTIZE"] and "FLOAT" in by_type["DEQUANTIZE"] and "CONVOLUTION" in by_type
    assert build_engine(path, tmp_path / "q.engine", SM89)["engine_bytes"] > 10_000


def test_fp16_attention_network_and_build(tmp_path):
    path = attention(tmp_path / "a.onnx")
    layers = network_layers(path, SM89)
    types = {layer["type"] for layer in layers}
    assert {"ATTENTION_INPUT", "ATTENTION_OUTPUT"} <= types, types
    assert all(layer["outputs"] == ["HALF"] for layer in layers if layer["type"].startswith("ATTENTION"))
    assert build_engine(path, tmp_path / "a.engine", SM89)["engine_bytes"] > 10_000


def test_failed_build_reports_the_builders_error(tmp_path):
    # fp32 Attention parses but has no TensorRT-RTX kernel: build_serialized_network returns None
    path = attention(tmp_path / "a32.onnx", dtype=TensorProto.FLOAT)
    with pytest.raises(EngineError, match="could not build an engine: .*dedicated kernel"):
        build_engine(path, tmp_path / "a32.engine", SM89)
    assert not (tmp_path / "a32.engine").exists()


def test_dynamic_batch_needs_shapes_for_a_profile(tmp_path):
    path = conv_relu(tmp_path / "d.onnx", batch="N")
    with pytest.raises(EngineError, match="x have dynamic dims"):
        build_engine(path, tmp_path / "d.engine", SM89)
    with pytest.raises(EngineError, match="does not fit"):
        build_engine(path, tmp_path / "d.engine", SM89, shapes={"x": (2, 3, 8, 8)})
    summary = build_engine(path, tmp_path / "d.engine", SM89, shapes={"x": (2, 3, 16, 16)})
    assert summary["dynamic_inputs"] == ["x"] and summary["engine_bytes"] > 10_000


# ---------------------------------------------------------------------------------------------
# Refusals at build time


def test_invalid_compute_capability_lists_the_valid_ones(tmp_path):
    onnx_path = conv_relu(tmp_path / "c.onnx")
    with pytest.raises(EngineError, match=r"sm90 is not a TensorRT-RTX target.*Hopper.*sm80, sm86, sm89, sm120"):
        build_engine(onnx_path, tmp_path / "c.engine", BuildOptions(compute_capabilities=("sm89", "sm90")))
    with pytest.raises(EngineError, match="give a tuple"):
        BuildOptions(compute_capabilities="sm89")


def test_bad_options_are_refused():
    with pytest.raises(EngineError, match="optimization level 7"):
        BuildOptions(optimization_level=7)
    with pytest.raises(EngineError, match="choose one of tensorrt-rtx, tensorrt"):
        BuildOptions(backend="onnxruntime")
    with pytest.raises(EngineError, match="needs full TensorRT"):
        BuildOptions(version_compatible=True)


def test_missing_plugin_library(tmp_path):
    options = BuildOptions(compute_capabilities=("sm89",), plugin_library=str(tmp_path / "libnope.so"))
    with pytest.raises(EngineError, match="libnope.so: plugin library not found"):
        build_engine(conv_relu(tmp_path / "c.onnx"), tmp_path / "c.engine", options)


def test_corrupt_or_missing_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(EngineError, match="parser refused it .*Failed to parse the ONNX model"):
        build_engine(bad, tmp_path / "bad.engine", SM89)
    with pytest.raises(EngineError, match="ONNX file not found"):
        network_layers(tmp_path / "absent.onnx", SM89)


def test_missing_backend_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, installed or not
    with pytest.raises(EngineError, match=r'tensorrt is not installed: pip install -e "\.\[tensorrt\]"'):
        load_backend("tensorrt")
    assert load_backend("tensorrt-rtx") is trt


# ---------------------------------------------------------------------------------------------
# The manifest


def _manifest(folder, engine_sha: str) -> dict:
    """A complete manifest as the exporter writes it, around one real engine."""
    io = {"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}],
          "outputs": [{"name": "y", "shape": [1, 8, 16, 16], "dtype": "float32"}]}
    graphs = {g: {"onnx": G.onnx_file(g), "onnx_sha256": "0" * 64, **io, "engine": G.engine_file(g),
                  "engine_sha256": engine_sha, "layers": G.layers_file(g)} for g in G.GRAPHS}
    return {"format": 2, "mirage_version": "0.1.0", "created": "2026-11-25T00:00:00+00:00", "model": {"name": "tiny"},
            "batch": 1, "max_batch": None,
            "options": {"precision": "fp16", "backend": "tensorrt-rtx", "gpus": ["sm89", "sm120"]},
            "checkpoint": {"path": "/ckpt/tiny", "sha256": "1" * 64}, "precision": "fp16",
            "temporal_attention": "onnx", "graphs": graphs, "backend": {"name": "tensorrt-rtx", "version": "1.7.1.116"},
            "target": {"compute_capabilities": ["sm89", "sm120"]}, "plugin": None, "build_options": {},
            "build_seconds": 1.5, "parity": {"passed": True},
            "rebuild_command": f"mirage-export --checkpoint /ckpt/tiny --out {folder} --precision fp16 "
                               f"--backend tensorrt-rtx --gpu sm89,sm120"}


def test_manifest_round_trip_and_completeness(conv_engine, tmp_path):
    folder, _, _ = conv_engine
    m = _manifest(tmp_path, sha256_file(folder / "denoise.engine"))
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    incomplete = copy.deepcopy(m)
    del incomplete["rebuild_command"], incomplete["backend"]["version"]
    del incomplete["graphs"]["denoise"]["engine_sha256"]
    with pytest.raises(EngineError, match="missing rebuild_command, backend.version, graphs.denoise.engine_sha256"):
        validate_manifest(incomplete)
    with pytest.raises(EngineError, match="incomplete"):
        write_manifest(tmp_path / "x", incomplete)  # refused before anything is written


def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(EngineError, match=r"no manifest.json; build it with `mirage-export --checkpoint"):
        read_manifest(tmp_path)
    (tmp_path / G.MANIFEST).write_text('{"format": 2, "graphs": ')
    with pytest.raises(EngineError, match="corrupt JSON"):
        read_manifest(tmp_path)


def test_check_loadable_refusals(tmp_path):
    m = _manifest(tmp_path, "0" * 64)
    check_loadable(m, "1.7.1.116", "sm89", None)  # same version, a targeted GPU, no plugin: loads
    check_loadable(m, "1.7.1.116", "sm_120", None)  # the sm_NN spelling too

    with pytest.raises(EngineError, match=r"built by tensorrt-rtx 1\.7\.1\.116 but this is tensorrt-rtx 1\.8\.0; "
                                          r"rebuild: mirage-export --checkpoint /ckpt/tiny .*--gpu sm89,sm120$"):
        check_loadable(m, "1.8.0", "sm89", None)
    with pytest.raises(EngineError, match=r"does not run on Hopper; full TensorRT is needed: .*--backend tensorrt"):
        check_loadable(m, "1.7.1.116", "sm90", None)
    with pytest.raises(EngineError, match=r"targets compute capabilities \[sm89, sm120\] but this GPU is sm86; "
                                          r"rebuild: .*--gpu sm89,sm120,sm86$"):
        check_loadable(m, "1.7.1.116", "sm86", None)

    # for an artifact in another folder, the command is built from the recorded options
    with pytest.raises(EngineError, match=r"rebuild: mirage-export --checkpoint /ckpt/tiny --out /art --precision fp16 "
                                          r"--backend tensorrt-rtx --gpu sm89,sm120$"):
        check_loadable(m, "1.8.0", None, None, folder="/art")


def test_rtx_engines_are_built_for_stream_capture():
    """TensorRT-RTX documents REQUIRE_USER_ALLOCATION as required for CUDA stream capture (1.2
    release notes): every RTX build config sets it, on the real builder."""
    from mirage.engine.build import _capabilities, _configure, _logger

    options = BuildOptions(compute_capabilities=("sm89",))
    config, _ = _configure(trt, trt.Builder(_logger(trt)), options, _capabilities(trt, ("sm89",)), None, [])
    assert config.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert not trt.Builder(_logger(trt)).create_builder_config().get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)


def test_check_loadable_plugin(tmp_path):
    plugin = tmp_path / "libmirage_plugin.so"
    plugin.write_bytes(b"the library the engine was built with")
    m = _manifest(tmp_path, "0" * 64)
    m["plugin"] = {"path": str(plugin), "sha256": sha256_file(plugin)}
    check_loadable(m, "1.7.1.116", "sm89", None)  # the manifest's own path, unchanged: loads
    plugin.write_bytes(b"rebuilt since")
    with pytest.raises(EngineError, match=r"differs from the one the engine was built with .*rebuild: mirage-export"):
        check_loadable(m, "1.7.1.116", "sm89", str(plugin))
    with pytest.raises(EngineError, match="which is missing"):
        check_loadable(m, "1.7.1.116", "sm89", str(tmp_path / "absent.so"))


def test_verify_file(conv_engine, tmp_path):
    folder, _, _ = conv_engine
    engine = tmp_path / "denoise.engine"
    engine.write_bytes((folder / "denoise.engine").read_bytes())
    digest = sha256_file(engine)
    verify_file(engine, digest, tmp_path, "REBUILD")
    assert (tmp_path / SIDECAR).is_file()  # the next load trusts the unchanged size and mtime
    with open(engine, "r+b") as f:  # flip a few bytes in the middle
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(EngineError, match="corrupt or modified .*rebuild: REBUILD"):
        verify_file(engine, digest, tmp_path, "REBUILD")
    engine.unlink()
    with pytest.raises(EngineError, match="missing; rebuild: REBUILD"):
        verify_file(engine, digest, tmp_path, "REBUILD")
    with pytest.raises(EngineError, match="records no hash"):
        verify_file(engine, None, tmp_path, "REBUILD")
