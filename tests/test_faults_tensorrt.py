"""Fault suite for the TensorRT path, each case as a user meets it: one line and exit status 2
(or the stated behaviour and its note), before any export, parity or hashing work where the
cause is known up front. TensorRT itself is the test double of tests/trt_double.py (fixture `trt`)."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import trt_double
from conftest import CKPT_GEN
from mirage.cli.export import main as export_main
from mirage.cli.run import main as run_main
from mirage.core import graphs as G
from mirage.core.errors import MirageError
from mirage.core.files import sha256_file
from mirage.engine.manifest import EngineError, check_loadable, read_manifest, write_manifest
from mirage.engine.verify import artifact_specs
from mirage.runtime import Pipeline
from mirage.runtime.tensorrt import TensorRTBackend

NO_DRIVER = "no NVIDIA GPU driver on this machine (libcuda.so.1 cannot be loaded)"


@pytest.fixture
def rtx(onnx_artifact, tmp_path):
    return trt_double.engine_artifact(onnx_artifact, tmp_path / "rtx")


def _run(args: list[str], tmp_path: Path):
    out = tmp_path / "o.gif"
    r = CliRunner().invoke(run_main, [*args, "--frames", "1", "--output", str(out)])
    return r, out


def _refused(args, tmp_path, match: str) -> str:
    r, out = _run(args, tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output and match in r.output, r.output
    assert not out.exists()
    return r.output


def _no_work(monkeypatch):
    """Fail the test if an artifact's files are hashed (the run's first real work)."""
    import mirage.runtime.artifact as A

    monkeypatch.setattr(A, "verify_artifact", lambda *a, **k: pytest.fail("the artifact was verified first"))


def test_backend_tensorrt_without_tensorrt_fails_at_once(rtx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # makes the import fail, installed or not
    _no_work(monkeypatch)
    _refused([str(rtx), "--backend", "tensorrt"], tmp_path,
             'tensorrt-rtx is not installed: pip install -e ".[tensorrt-rtx]"')


def test_backend_tensorrt_without_a_gpu_driver_says_so(trt, rtx, tmp_path, monkeypatch):
    import mirage.runtime.tensorrt as T

    monkeypatch.setattr(T, "missing_gpu", lambda index: NO_DRIVER)
    _no_work(monkeypatch)
    output = _refused([str(rtx), "--backend", "tensorrt"], tmp_path, f"needs an NVIDIA GPU: {NO_DRIVER}")
    assert "deserialize" not in output and "rebuild" not in output


def test_a_gpu_that_is_not_there_is_named(trt, rtx, tmp_path):
    _refused([str(rtx), "--backend", "tensorrt", "--device", "cuda:3"], tmp_path,
             "cuda:3 asked for, but the driver sees 2 GPU(s)")


def test_device_cpu_with_backend_tensorrt_is_refused(trt, rtx, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    _refused([str(rtx), "--backend", "tensorrt", "--device", "cpu"], tmp_path,
             "TensorRT engines run on a GPU, not --device cpu")


def test_auto_on_the_cpu_runs_the_onnx_graphs_and_says_so(rtx, tmp_path):
    r, out = _run([str(rtx), "--device", "cpu"], tmp_path)
    assert r.exit_code == 0 and out.is_file(), r.output
    assert "running its ONNX graphs on ONNX Runtime (CPU), not its TensorRT engines: --device cpu" in r.output


def test_a_corrupted_engine_is_refused_under_the_default_backend(rtx, tmp_path, monkeypatch):
    """Not run on ONNX Runtime without a word: auto verifies every file of the artifact."""
    import mirage.runtime.artifact as A

    monkeypatch.setattr(A, "cuda_available", lambda: False)
    engine = rtx / G.engine_file(G.DENOISE)
    engine.write_bytes(engine.read_bytes()[:-100])
    _refused([str(rtx)], tmp_path, "denoise.engine: corrupt or modified")
    r, out = _run([str(rtx), "--backend", "onnxruntime"], tmp_path)  # the ONNX graphs alone, when asked for
    assert r.exit_code == 0 and out.is_file(), r.output


def test_an_engine_whose_io_differs_from_the_spec_is_refused_naming_the_tensor(trt, rtx):
    """The context_encode plan under denoise's name (hash updated): refused at load, not at the first frame."""
    shutil.copy(rtx / G.engine_file(G.CONTEXT), rtx / G.engine_file(G.DENOISE))
    m = read_manifest(rtx)
    m["graphs"][G.DENOISE]["engine_sha256"] = sha256_file(rtx / G.engine_file(G.DENOISE))
    write_manifest(rtx, m)
    with pytest.raises(EngineError, match=r"denoise: the engine's inputs/outputs differ from the manifest "
                                          r"\(no input 'x_t'\); rebuild: mirage-export"):
        TensorRTBackend(rtx, m, artifact_specs(m)[1], "cuda:0")


def _with_plugin(art: Path, content: bytes) -> dict:
    lib = art / "libmirage_plugins.so"
    lib.write_bytes(content)
    m = read_manifest(art)
    m["plugin"] = {"path": lib.name, "sha256": sha256_file(lib)}
    write_manifest(art, m)
    return m


def test_the_plugin_library_travels_with_the_artifact(trt, rtx, tmp_path):
    _with_plugin(rtx, trt_double.PLUGIN_MAGIC + b" v1")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(rtx, moved)
    m = read_manifest(moved)
    TensorRTBackend(moved, m, artifact_specs(m)[1], "cuda:0").close()
    assert trt.get_plugin_registry().get_creator(G.PLUGIN_NAME, G.PLUGIN_VERSION, G.PLUGIN_NAMESPACE) is not None
    (moved / "libmirage_plugins.so").unlink()
    with pytest.raises(EngineError, match="needs the plugin library libmirage_plugins.so, which is missing at "
                                          f"{moved}/libmirage_plugins.so"):
        TensorRTBackend(moved, m, artifact_specs(m)[1], "cuda:0")


def test_a_file_that_is_not_a_plugin_library_is_refused(trt, rtx):
    m = _with_plugin(rtx, b"not a shared library")
    with pytest.raises(EngineError, match="TensorRT loaded no plugin from it"):
        TensorRTBackend(rtx, m, artifact_specs(m)[1], "cuda:0")


def test_export_copies_the_plugin_library_into_the_artifact(trt, tmp_path, monkeypatch):
    """The engine build itself is the double's (no full TensorRT here): what is checked is the copy,
    and the relative path in the manifest."""
    import mirage.bridge.artifact as A

    def build(onnx, engine, options, timing_cache_path=None, log=None, shapes=None):
        Path(engine).write_bytes(trt_double.plan(Path(onnx).read_bytes()))
        return {"compute_capabilities": ["sm89"]}

    monkeypatch.setattr(A, "build_engine", build)
    lib = tmp_path / "build" / "libmirage_plugins.so"
    lib.parent.mkdir()
    lib.write_bytes(trt_double.PLUGIN_MAGIC)
    out = tmp_path / "art"
    A.build_artifact(CKPT_GEN, out, A.ArtifactOptions(precision="fp32", backend="tensorrt-rtx", plugin_library=str(lib),
                                                      calibration_frames=2, parity_frames=2))
    m = read_manifest(out)
    assert m["plugin"] == {"path": "libmirage_plugins.so", "sha256": sha256_file(lib)}
    assert (out / "libmirage_plugins.so").read_bytes() == lib.read_bytes()
    shutil.rmtree(lib.parent)  # the build folder gone: the artifact still loads
    TensorRTBackend(out, m, artifact_specs(m)[1], "cuda:0").close()


@pytest.mark.parametrize("backend, module", [("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")])
def test_export_without_tensorrt_fails_before_any_work(tmp_path, monkeypatch, backend, module):
    import mirage.bridge.artifact as A

    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(A, "load_checkpoint", lambda *a: pytest.fail("work began"))
    r = CliRunner().invoke(export_main, ["--backend", backend, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and f"{backend} is not installed" in r.output and "Traceback" not in r.output, r.output


def test_export_with_full_tensorrt_but_no_gpu_fails_before_any_work(trt, tmp_path, monkeypatch):
    import mirage.bridge.artifact as A

    monkeypatch.setattr(A, "missing_gpu", lambda index: NO_DRIVER)
    monkeypatch.setattr(A, "load_checkpoint", lambda *a: pytest.fail("work began"))
    r = CliRunner().invoke(export_main, ["--backend", "tensorrt", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and f"builds on an NVIDIA GPU: {NO_DRIVER}" in r.output, r.output


def test_version_compatible_engines_load_with_host_code_allowed(trt, onnx_artifact, tmp_path):
    """Full TensorRT's version-compatible plans: the runtime allows their host code (else TensorRT
    refuses them), and a later TensorRT of the same major version may load them."""
    flags = {"version_compatible": True}
    art = trt_double.engine_artifact(onnx_artifact, tmp_path / "vc", backend="tensorrt", build_options=flags,
                                     version_compatible=True)
    m = read_manifest(art)
    backend = TensorRTBackend(art, m, artifact_specs(m)[1], "cuda:0")
    assert backend.runtime.engine_host_code_allowed
    backend.close()
    m["build_options"] = {}  # a manifest that does not say so: TensorRT's own refusal, with the rebuild
    write_manifest(art, m)
    with pytest.raises(EngineError, match="could not deserialize the engine .*rebuild: mirage-export"):
        TensorRTBackend(art, m, artifact_specs(m)[1], "cuda:0")
    m.update(backend={"name": "tensorrt", "version": "10.8.0"}, build_options=flags)
    check_loadable(m, "10.12.0", None, None, art)
    for later in ("11.0.0", "10.7.0"):
        with pytest.raises(EngineError, match=f"built by tensorrt 10.8.0 but this is tensorrt {later}"):
            check_loadable(m, later, None, None, art)


def test_pipeline_load_refuses_like_the_cli(trt, rtx):
    with pytest.raises(MirageError, match="not --device cpu"):
        Pipeline.load(rtx, backend="tensorrt", device="cpu")
    with pytest.raises(MirageError, match=r"device 'gpu1': TensorRT runs on cuda or cuda:N"):
        Pipeline.load(rtx, backend="tensorrt", device="gpu1")


def test_the_io_check_names_each_kind_of_mismatch():
    """check_signature (ONNX Runtime's and TensorRT's view against the spec), by name and mode."""
    from types import SimpleNamespace

    from mirage.core.graphs import unet_graphs
    from mirage.engine.verify import check_signature

    cfg = SimpleNamespace(channels=3, image_size=8, cond_channels=0, context_frames=2, memory_tokens=4,
                          temporal_dim=4, frame_size=0)
    spec = unet_graphs(cfg, 1, None, "fp32")[G.CONTEXT]  # a stand-in config: the U-Net family's specs directly
    inputs, outputs = spec.io()
    check_signature(G.CONTEXT, (inputs[::-1], outputs), spec, "R")  # another order: TensorRT binds by name
    cases = {"kv is an input where an output is expected": (inputs + outputs, []),
             "no input 't_ctx'": (inputs[:1], outputs),
             "frame: float16[1, 3, 8, 8] where float32[1, 3, 8, 8] is expected":
                 ([{**inputs[0], "dtype": "float16"}, inputs[1]], outputs),
             "t_ctx: float32[2] where float32[1] is expected": ([inputs[0], {**inputs[1], "shape": [2]}], outputs),
             "unexpected tensors ['extra']": (inputs, outputs + [{**outputs[0], "name": "extra"}])}
    for message, actual in cases.items():
        with pytest.raises(EngineError, match=re.escape(f"({message}); rebuild: R")):
            check_signature(G.CONTEXT, actual, spec, "R")
