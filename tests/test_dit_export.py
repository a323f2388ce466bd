"""The DiT's exported graphs: specs, the pure graph modules against BlockStepper, ONNX parity, TensorRT-RTX
engines and the manifest (dit-tiny, CPU)."""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mirage.core import graphs as G
from mirage.core.config import get_config, get_dit_config
from mirage.core.dit_step import block_inputs, rope_tables, timestep_embedding
from mirage.engine.manifest import EngineError, validate_manifest
from mirage.engine.verify import verify_artifact
from mirage.model.dit import WanDiT, sinusoidal_embedding
from mirage.model.dit_cache import BlockStepper

TINY = get_dit_config("dit-tiny")


def test_specs_come_from_the_config_at_fixed_shapes():
    wan = G.model_graphs(get_dit_config("wan-1.3b"), batch=2, precision="fp16")
    assert set(wan) == set(G.DIT_GRAPHS) == set(G.FAMILY_GRAPHS[get_dit_config("wan-1.3b").family])
    step = wan[G.DIT_STEP]
    assert step.tensor(G.X_T).shape == (2, 16, 3, 60, 104) and step.tensor(G.X_T).dtype == "float16"
    assert step.tensor(G.CACHE_K).shape == (2, 30, 12, 21 * 1560, 128)  # the whole window, every fill level
    assert step.tensor(G.NEW_K).shape == (2, 30, 12, 3 * 1560, 128)
    assert step.tensor(G.T_EMB).shape == (2, 3, 256) and step.tensor(G.T_EMB).dtype == "float32"
    assert step.tensor(G.ROPE_COS).shape == (2, 3 * 1560, 64) and step.tensor(G.SLOTS).dtype == "int32"
    assert step.tensor(G.VALID).shape == (2, 21 * 1560) and step.max_batch is None and step.profile() is None
    assert [x.name for x in step.outputs] == [G.V, G.NEW_K, G.NEW_V]
    assert [x.name for x in wan[G.DIT_CACHE_WRITE].outputs] == [G.NEW_K, G.NEW_V]
    assert wan[G.DIT_CACHE_WRITE].inputs == step.inputs
    assert wan[G.DIT_TEXT].tensor(G.TEXT_K).shape == (2, 30, 12, 512, 128)
    assert list(G.model_graphs(get_config("tiny"))) == [G.DENOISE, G.CONTEXT]  # the U-Net's, unchanged


def test_static_inputs_match_the_model():
    """The torch-free RoPE angles and timestep embeddings equal WanDiT's, and the slots / validity
    follow the cache's sink + ring layout."""
    cfg = dataclasses.replace(TINY, sink_frames=2)
    model = WanDiT(cfg)
    cos, sin = rope_tables(cfg, np.array([[9, 10]]))
    ref_cos, ref_sin = model.rope(torch.tensor([9, 10]))
    np.testing.assert_array_equal(cos[0], ref_cos.numpy())
    np.testing.assert_array_equal(sin[0], ref_sin.numpy())
    t = np.array([[937.5, 0.0]], np.float32)
    np.testing.assert_array_equal(timestep_embedding(cfg, t),
                                  sinusoidal_embedding(torch.from_numpy(t), cfg.freq_dim).float().numpy())
    tokens = cfg.tokens_per_frame
    first = block_inputs(cfg, [0])  # frames 0, 1: slots 0, 1; only they are valid
    assert first[G.SLOTS][0, tokens] == tokens and first[G.VALID].sum() == 2 * tokens
    rolled = block_inputs(cfg, [6])  # frames 6, 7 of a (2 sink + 4 ring) window: slots 2, 3
    assert rolled[G.SLOTS][0, 0] == 2 * tokens and rolled[G.VALID].sum() == cfg.window_frames * tokens
    both = block_inputs(cfg, [0, 6])  # each row its own stream at its own frame: row b is the row alone
    for name in (G.SLOTS, G.VALID, G.ROPE_COS):
        np.testing.assert_array_equal(both[name], np.concatenate([first[name], rolled[name]]))


def test_pure_graphs_with_an_external_cache_equal_the_block_stepper():
    """BlockStepper (in-place cache, one span per fill level) against the pure graph modules driven by the
    runtime's block loop (BlockUnit through CpuExecution, the PyTorch backend), which writes the cache itself:
    the same latents while the cache fills, is full and rolls past the sink (float32), given the noise the
    runtime drew, for each row of a batch of 2 with its own prompt; export parity's rollouts run this loop."""
    from mirage.export.dit_export import cpu_pipeline, runtime_blocks
    from mirage.model.dit_backend import DiTTorchBackend
    from mirage.model.torch_device import TorchCpu

    cfg = dataclasses.replace(TINY, sink_frames=2)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    specs = G.model_graphs(cfg, batch=2)
    text = np.random.default_rng(3).standard_normal((2, 11, cfg.text_dim)).astype(np.float32)  # short: both pad it
    stepper = BlockStepper(model, batch=2)
    stepper.set_prompt(torch.from_numpy(text))
    with cpu_pipeline(DiTTorchBackend(model, specs, "cpu"), cfg, specs, text[0], 3, TorchCpu()) as pipe:
        pipe.set_prompt(text[1], rows=[1])
        for x0, _, noise, finite in runtime_blocks(pipe, 5):
            ref = stepper.step(torch.from_numpy(noise)).numpy()
            np.testing.assert_allclose(x0, ref, atol=1e-4, rtol=0)
            assert finite
        np.testing.assert_allclose(pipe.buf.cache_k.numpy(), stepper.cache.k.transpose(0, 1).numpy(), atol=1e-4, rtol=0)


def test_a_non_finite_block_is_reported_to_the_parity_not_raised():
    """A block that comes out non-finite (an fp16 overflow, say) is returned flagged where CpuExecution raises,
    so the parity fails with its numbers (or --allow-parity-failure writes it) rather than stopping the export."""
    from mirage.export.dit_export import cpu_pipeline, runtime_blocks
    from mirage.model.dit_backend import DiTTorchBackend
    from mirage.model.torch_device import TorchCpu

    cfg = dataclasses.replace(TINY, width=64, height=64, num_layers=1)
    model = WanDiT(cfg).eval().requires_grad_(False)
    model.patch_embedding.weight[0, 0].fill_(float("nan"))
    specs = G.model_graphs(cfg)
    with cpu_pipeline(DiTTorchBackend(model, specs, "cpu"), cfg, specs, np.zeros((1, cfg.text_dim), np.float32), 0,
                      TorchCpu()) as pipe:
        blocks = list(runtime_blocks(pipe, 2))
    assert [finite for *_, finite in blocks] == [False, False] and np.isnan(blocks[1][0]).all()


trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx-cu13) builds the engines")


@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory):
    """dit-tiny, random weights, fp16, TensorRT-RTX engines for sm89, parity over 50 latent frames."""
    from mirage.bridge.artifact import ArtifactOptions
    from mirage.bridge.dit_artifact import build_dit_artifact

    out = tmp_path_factory.mktemp("dit") / "fp16"
    build_dit_artifact(TINY, out, ArtifactOptions(precision="fp16", backend="tensorrt-rtx", gpus=("sm89",)))
    return out, json.loads((out / G.MANIFEST).read_text())


def test_fp16_artifact_matches_pytorch_and_builds_engines(fp16_artifact):
    out, m = fp16_artifact
    assert m["family"] == "dit" and m["model"]["name"] == "dit-tiny" and m["checkpoint"]["random_seed"] == 0
    rollout = m["parity"]["rollout"]
    assert rollout["frames"] == 50 and rollout["psnr_min_db"] >= 40  # the fp16 target
    assert all(t["rel"] <= 1e-2 for t in m["parity"]["tensors"].values()) and m["parity"]["passed"]
    assert 1 < m["parity"]["fp16_headroom"] == 65504 / m["parity"]["fp16_activation_peak"]
    assert set(m["parity"]["tensors"]) >= {"dit_step.v", "dit_step.new_k", "dit_cache_write.new_v", "dit_text.text_k"}
    specs = G.model_graphs(TINY, precision="fp16")
    for graph, meta in m["graphs"].items():
        assert (meta["inputs"], meta["outputs"]) == specs[graph].io()
        assert (out / meta["engine"]).stat().st_size == meta["build"]["engine_bytes"] > 0
        assert "engine_refused" not in meta
    assert m["target"]["compute_capabilities"] == ["sm89"]
    cfg, _ = verify_artifact(out, m, engines=True)  # the loader's check: hashes, and I/O against the DiTConfig's specs
    assert cfg == TINY
    assert m["rebuild_command"].startswith("mirage-export --dit dit-tiny --random-weights")


def test_a_refused_engine_is_recorded_not_dropped(tmp_path, monkeypatch):
    """fp32 with the opset-23 `Attention` op (not decomposed): ONNX Runtime runs it (parity holds), TensorRT-RTX
    1.7 has no fp32 kernel for it and refuses the two graphs with attention; dit_text (none) still builds."""
    from mirage.bridge import dit_artifact
    from mirage.bridge.artifact import ArtifactOptions
    from mirage.export.onnx_export import ExportOptions

    monkeypatch.setattr(dit_artifact, "ExportOptions", functools.partial(ExportOptions, decompose_attention=False))
    m = dit_artifact.build_dit_artifact(TINY, tmp_path / "a", ArtifactOptions(
        precision="fp32", backend="tensorrt-rtx", gpus=("sm89",), parity_frames=2))
    assert all(t["rel"] <= 1e-4 for t in m["parity"]["tensors"].values())
    refused = dit_artifact.refused_engines(m)
    assert set(refused) == {G.DIT_STEP, G.DIT_CACHE_WRITE} and all("Attention" in why for why in refused.values())
    assert m["graphs"][G.DIT_TEXT]["engine"] and not (tmp_path / "a" / G.engine_file(G.DIT_STEP)).exists()
    with pytest.raises(EngineError, match="dit_step: the artifact has no engine for it .*Attention"):
        verify_artifact(tmp_path / "a", m, engines=True)
    validate_manifest(m)  # a refusal is a valid record ...
    del m["graphs"][G.DIT_STEP]["engine_refused"]
    with pytest.raises(EngineError, match="dit_step records no engine"):  # ... a silent gap is not
        validate_manifest(m)


@pytest.mark.parametrize("args, message", [
    (["--dit", "dit-tiny"], "give either --dit-weights PATH or --random-weights"),
    (["--random-weights"], "add --dit NAME"),
    (["--dit", "dit-tiny", "--random-weights", "--precision", "int8"],
     "the DiT exports fp32, fp16, bf16, fp8 (INT8 Q/DQ is the U-Net's)"),
    (["--precision", "bf16"], "--precision bf16 exports a DiT (--dit NAME); a U-Net exports fp32, fp16, int8 or fp8"),
    (["--dit", "dit-tiny", "--random-weights", "--precision", "bf16", "--calib-frames", "2"],
     "--calib-frames calibrates int8/fp8 and measures fp16's range: bf16 uses none"),
])
def test_export_cli_refuses_an_incomplete_dit_request(args, message, tmp_path):
    from mirage.cli.export import main

    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "x").exists()


def test_fp8_artifact_quantizes_the_block_graphs_and_builds_engines(tmp_path):
    """--precision fp8: dit_step / dit_cache_write as ModelOpt FP8 E4M3 Q/DQ graphs (calibrated on another
    rollout than the parity's), dit_text in fp32, parity within FP8's tolerance, TensorRT-RTX engines for
    sm89; each graph's entry says what it holds (dit-tiny at 64x64 with 2 layers, short rollouts)."""
    import onnx

    from mirage.bridge.artifact import ArtifactOptions
    from mirage.bridge.dit_artifact import build_dit_artifact

    cfg = dataclasses.replace(TINY, width=64, height=64, num_layers=2)
    out = tmp_path / "fp8"
    m = build_dit_artifact(cfg, out, ArtifactOptions(precision="fp8", backend="tensorrt-rtx", gpus=("sm89",),
                                                     calibration_frames=2, parity_frames=8))
    assert m["precision"] == "fp8" and m["parity"]["passed"] and m["parity"]["tolerance_rel"] == 0.1
    assert all(1e-4 < t["rel"] <= 0.1 for k, t in m["parity"]["tensors"].items() if not k.startswith("dit_text"))
    assert 35 < m["parity"]["rollout"]["psnr_min_db"] < 100
    holds = {g: meta["holds"] for g, meta in m["graphs"].items()}
    assert holds[G.DIT_TEXT] == "fp32" and holds[G.DIT_STEP].startswith("fp8 e4m3 Q/DQ (ModelOpt, 8 calibration")
    step = onnx.load(str(out / m["graphs"][G.DIT_STEP]["onnx"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in step.graph.initializer)
    assert sum(n.op_type == "QuantizeLinear" for n in step.graph.node) >= cfg.num_layers * 10
    specs = G.model_graphs(cfg, precision="fp8")  # 8-bit graphs keep float32 I/O
    for graph, meta in m["graphs"].items():
        assert (meta["inputs"], meta["outputs"]) == specs[graph].io() and meta["build"]["engine_bytes"] > 0
    assert "--precision fp8" in m["rebuild_command"] and "--calib-frames 2" in m["rebuild_command"]
    assert verify_artifact(out, m, engines=True)[0] == cfg  # the loader's checks take an fp8 DiT artifact


def test_bf16_artifact_builds_bf16_engines_and_checks_the_graphs_widened_twins(tmp_path):
    """--precision bf16: the three graphs hold bf16 weights and compute in bf16 behind float32 I/O, TensorRT-RTX
    builds them for sm80 (strongly typed: every MatMul and the attention in BF16), and parity runs their widened
    twins on ONNX Runtime, which the manifest says (dit-tiny at 64x64 with 2 layers, short rollouts)."""
    import onnx

    from mirage.bridge.artifact import ArtifactOptions
    from mirage.bridge.dit_artifact import build_dit_artifact

    cfg = dataclasses.replace(TINY, width=64, height=64, num_layers=2)
    out = tmp_path / "bf16"
    m = build_dit_artifact(cfg, out, ArtifactOptions(precision="bf16", backend="tensorrt-rtx", gpus=("sm80",),
                                                     parity_frames=8))
    assert m["precision"] == "bf16" and m["parity"]["passed"] and m["parity"]["tolerance_rel"] == 3e-2
    # rounded to bf16 (fp32 twins would be ~1e-7 off), and within bf16's tolerance
    assert all(1e-3 < t["rel"] <= 3e-2 for t in m["parity"]["tensors"].values())
    assert 50 < m["parity"]["rollout"]["psnr_min_db"] < 90
    assert m["parity"]["graphs_checked"].startswith("the bf16 graphs' widened twins on ONNX Runtime")
    assert "not the bf16 graphs themselves" in m["parity"]["graphs_checked"]
    assert not list(out.glob("*widened*")) and not list(out.glob(".*"))  # the twins are gone
    specs = G.model_graphs(cfg, precision="bf16")  # float32 I/O, as the 8-bit graphs
    for graph, meta in m["graphs"].items():
        assert meta["holds"] == "bf16 (float32 I/O, cast inside)" and meta["build"]["engine_bytes"] > 0
        assert (meta["inputs"], meta["outputs"]) == specs[graph].io()
        weights = [w for w in onnx.load(str(out / meta["onnx"])).graph.initializer if len(w.dims) >= 2]
        assert weights and all(w.data_type == onnx.TensorProto.BFLOAT16 for w in weights)
    layers = json.loads((out / m["graphs"][G.DIT_STEP]["layers"]).read_text())["layers"]
    compute = [(layer["type"], layer["outputs"]) for layer in layers
               if layer["type"] in ("MATRIX_MULTIPLY", "ATTENTION_OUTPUT")]
    assert len(compute) > cfg.num_layers * 4 and all(dtypes == ["BF16"] for _, dtypes in compute)
    assert "--precision bf16" in m["rebuild_command"]
    assert verify_artifact(out, m, engines=True)[0] == cfg  # the loader's checks take a bf16 DiT artifact


def test_a_bf16_graphs_widened_twin_runs_on_onnx_runtime(tmp_path, monkeypatch):
    """ONNX Runtime's CPU provider cannot load a bf16 graph; its widened twin loads, also with the weights in a
    side file (as wan-1.3b's), and computes what PyTorch's bf16 model computes, to bf16's precision."""
    import copy

    from mirage.core.errors import BackendError
    from mirage.core.ort import OrtBackend
    from mirage.export import onnx_export
    from mirage.export.bf16 import widened_twin
    from mirage.export.dit_export import export_dit_graph, ort_run, record_dit_calls, torch_run

    cfg = dataclasses.replace(TINY, width=64, height=64, num_layers=1)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval().requires_grad_(False)
    calls = record_dit_calls(model, blocks=3)[G.DIT_STEP]
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    graph = export_dit_graph(model, G.DIT_STEP, tmp_path / "dit_step.onnx", onnx_export.ExportOptions("bf16"), calls[0])
    assert (tmp_path / "dit_step.onnx.data").stat().st_size > graph.stat().st_size
    with pytest.raises(BackendError, match="NOT_IMPLEMENTED"):
        OrtBackend({G.DIT_STEP: graph})
    twin = widened_twin(graph)
    _assert_every_bf16_value_is_kept_and_no_op_computes_in_bf16(graph, twin)
    run, ort = ort_run({G.DIT_STEP: twin})
    try:
        out = run(G.DIT_STEP, calls[-1])  # a block of a rolled window
    finally:
        ort.close()
    fp32 = torch_run(model, G.model_graphs(cfg))(G.DIT_STEP, calls[-1])
    # the fp16 specs name the inputs torch_run casts to the model's dtype (bf16 here)
    bf16 = torch_run(copy.deepcopy(model).bfloat16(), G.model_graphs(cfg, precision="fp16"))(G.DIT_STEP, calls[-1])

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for name, r in fp32.items():
        assert 1e-3 < rel(out[name], r) < 2e-2 and rel(out[name], bf16[name]) < 2e-2, name


def _assert_every_bf16_value_is_kept_and_no_op_computes_in_bf16(graph, twin):
    import onnx

    bf16 = onnx.TensorProto.BFLOAT16
    source = onnx.shape_inference.infer_shapes(onnx.load(str(graph), load_external_data=False)).graph
    values = {v.name for v in source.value_info if v.type.tensor_type.elem_type == bf16}
    values |= {w.name for w in source.initializer if w.data_type == bf16}
    nodes = onnx.load(str(twin), load_external_data=False).graph.node
    to = {n.output[0]: next((a.i for a in n.attribute if a.name == "to"), None) for n in nodes if n.op_type == "Cast"}
    made = {n.output[0] for n in nodes if n.op_type == "Constant"} | {y for y, t in to.items() if t == bf16}
    assert len(values) > 100 and values <= made | {w.name for w in source.initializer}  # each rounded to bf16
    assert not any(set(n.input) & values for n in nodes if n.op_type not in ("Cast", "Constant"))


def test_export_without_a_recorded_rollout_runs_on_onnx_runtime(tmp_path):
    """export_dit_onnx (scripts/export_wan.py's path: traced on uninitialized feeds, no rollout) writes graphs
    that compute what PyTorch computes on a real rollout's feeds, and reports their cost."""
    from mirage.export.dit_export import export_dit_onnx, ort_run, record_dit_calls, torch_run

    cfg = dataclasses.replace(TINY, width=64, height=64, num_layers=1)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval().requires_grad_(False)
    report = export_dit_onnx(model, tmp_path, "fp32")
    assert list(report) == list(G.DIT_GRAPHS)
    assert all(r["seconds"] > 0 and r["bytes"] == (tmp_path / G.onnx_file(g)).stat().st_size
               for g, r in report.items())
    feeds = record_dit_calls(model, blocks=4)[G.DIT_STEP][-1]  # a block of a rolled window
    files = {g: tmp_path / G.onnx_file(g) for g in G.DIT_GRAPHS}
    run, ort = ort_run(files)
    try:
        out = run(G.DIT_STEP, feeds)
    finally:
        ort.close()
    ref = torch_run(model, G.model_graphs(cfg))(G.DIT_STEP, feeds)
    for name, r in ref.items():
        np.testing.assert_allclose(out[name], r, atol=1e-4 * float(np.abs(r).max()), rtol=0)


def test_graph_precision_keeps_a_bf16_or_8_bit_artifacts_autoencoder_in_fp32():
    from mirage.export.dit_export import graph_precision

    assert [graph_precision(g, "bf16") for g in (G.DIT_STEP, G.ENCODE, G.DECODE)] == ["bf16", "fp32", "fp32"]
    assert [graph_precision(g, "fp16") for g in (G.DIT_STEP, G.DECODE)] == ["fp16", "fp16"]
    assert graph_precision(G.DECODE, "fp8") == "fp32"


def test_a_bf16_artifact_on_the_cpu_is_one_line_not_onnx_runtime_s_matmul_error(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 MatMul: mirage-run said its raw NOT_IMPLEMENTED error; the
    runtime says where a bf16 artifact runs, before any graph is loaded (an ONNX-only build, 32x32, 1 layer)."""
    from mirage.bridge.artifact import ArtifactOptions
    from mirage.bridge.dit_artifact import build_dit_artifact
    from mirage.cli.run import main

    out = tmp_path / "bf16"
    build_dit_artifact(dataclasses.replace(TINY, width=32, height=32, num_layers=1), out,
                       ArtifactOptions(precision="bf16", backend="onnx", parity_frames=2))
    result = CliRunner().invoke(main, [str(out), "--frames", "2", "--output", str(tmp_path / "o.gif")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == (f"Error: {out} is a bf16 artifact: it runs on TensorRT on a GPU (engines of mirage-export "
                        "--backend tensorrt or tensorrt-rtx), not on ONNX Runtime's CPU provider, which has no "
                        "bfloat16 kernels; for the CPU export --precision fp32 or fp16")
