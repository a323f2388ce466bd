"""Open an artifact folder for the runtime: read the manifest through the validated reader,
verify its files and graphs against the model config's specs, and pick the backend."""
from __future__ import annotations

import sys
from pathlib import Path

from mirage.core.config import PipelineOptions
from mirage.core.graphs import model_graphs
from mirage.core.device import cuda_available
from mirage.core.errors import BackendError
from mirage.core.ort import OrtBackend
from mirage.engine.manifest import EngineError, read_manifest, rebuild_command, sha256_file, with_option
from mirage.engine.verify import check_signature, verify_artifact


def open_artifact(path: Path, backend: str, device: str, options: PipelineOptions):
    """(backend, model config, graph specs, manifest) for an artifact folder."""
    manifest = read_manifest(path)
    rebuild = rebuild_command(manifest, path)
    has_engine = manifest["backend"]["name"] != "onnx"
    if options.kernel_library:
        raise BackendError("--kernel-library is for the torch backend (checkpoints); an artifact takes the fused "
                           "kernel as the TensorRT plugin (`mirage-export --temporal-attention plugin`)")
    tuned = [f for f in ("dtype", "compile", "channels_last", "freeze", "precompute_time") if getattr(options, f)]
    if tuned:
        raise BackendError(f"--fast / --compile ({', '.join(tuned)}) tune the torch backend, which runs checkpoints; "
                           "an artifact's precision and kernels are fixed when it is exported (mirage-export "
                           "--precision)")
    if manifest["batch"] != options.batch and not (manifest["max_batch"] and options.batch <= manifest["max_batch"]):
        raise EngineError(f"{path} runs a batch of {manifest['batch']}"
                          + (f" (up to {manifest['max_batch']})" if manifest["max_batch"] else "")
                          + f", not {options.batch}; rebuild with --batch/--max-batch: {rebuild}")
    use_trt = backend == "tensorrt" or (backend == "auto" and has_engine and cuda_available())
    if backend == "torch":
        raise BackendError(f"{path} is an artifact; the torch backend runs checkpoints (pass the checkpoint "
                           f"folder {manifest['checkpoint']['path']})")
    if use_trt and not has_engine:
        raise EngineError(f"{path} has no engines; rebuild: {with_option(rebuild, '--backend', 'tensorrt')}")
    if not use_trt and device not in ("auto", "cpu"):
        raise BackendError(f"--device {device}: the onnxruntime backend runs on the CPU (its CPU execution provider); "
                           f"use --device cpu, or engines for a GPU: {with_option(rebuild, '--backend', 'tensorrt')}")
    cfg, recorded = verify_artifact(path, manifest, engines=use_trt)
    _warn_if_checkpoint_changed(manifest)
    # buffers at the batch asked for (a dynamic-batch artifact runs any batch up to its max)
    specs = model_graphs(cfg, options.batch, manifest["max_batch"], manifest["precision"])
    if use_trt:
        from mirage.runtime.tensorrt import TensorRTBackend

        impl = TensorRTBackend(path, manifest, specs, device="cuda:0" if device == "auto" else device)
        return impl, cfg, specs, manifest
    impl = OrtBackend({g: path / m["onnx"] for g, m in manifest["graphs"].items()})
    for graph in specs:
        check_signature(graph, impl.signature(graph), recorded[graph], rebuild)
    return impl, cfg, specs, manifest


def _warn_if_checkpoint_changed(manifest: dict) -> None:
    """The artifact is self-contained; a changed checkpoint only means a rebuild would differ."""
    ckpt = Path(manifest["checkpoint"]["path"]) / "model.safetensors"
    if ckpt.is_file() and ckpt.stat().st_size < 1 << 30 and sha256_file(ckpt) != manifest["checkpoint"]["sha256"]:
        print(f"note: {ckpt} changed since this artifact was exported; the artifact runs the weights it was "
              "built from", file=sys.stderr)
