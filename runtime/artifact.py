"""Open an artifact folder for the runtime: read the manifest through the validated reader,
verify its files and graphs against the model config's specs, and pick the backend."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mirage.core.config import CONFIG_FAMILIES, ModelConfig, PipelineOptions
from mirage.core.device import cuda_available, missing_gpu
from mirage.core.errors import BackendError
from mirage.core.ort import OrtBackend
from mirage.engine.manifest import EngineError, read_manifest, rebuild_command, sha256_file, with_option
from mirage.engine.verify import artifact_specs, check_signature, verify_artifact


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
                          + f", not {options.batch}; {batch_remedy(path, manifest, rebuild, options.batch)}")
    if backend == "torch":
        raise BackendError(f"{path} is an artifact; the torch backend runs checkpoints (pass the checkpoint "
                           f"folder {manifest['checkpoint']['path']})")
    if backend == "tensorrt" and not has_engine:
        raise EngineError(f"{path} has no engines; rebuild: {with_option(rebuild, '--backend', 'tensorrt')}")
    use_trt = backend == "tensorrt" or (backend == "auto" and has_engine and _gpu_asked(device))
    if not use_trt and manifest["precision"] == "bf16":  # ONNX Runtime's own error is a raw NOT_IMPLEMENTED MatMul
        raise BackendError(f"{path} is a bf16 artifact: it runs on TensorRT on a GPU (engines of mirage-export "
                           "--backend tensorrt or tensorrt-rtx), not on ONNX Runtime's CPU provider, which has no "
                           "bfloat16 kernels; for the CPU export --precision fp32 or fp16")
    if use_trt:
        from mirage.runtime.tensorrt import preflight

        preflight(manifest, device)  # TensorRT, cuda-python and the GPU: said now, before any file is hashed
    elif backend == "auto" and has_engine:
        why = "--device cpu" if device == "cpu" else missing_gpu(0)
        print(f"note: {path}: running its ONNX graphs on ONNX Runtime (CPU), not its TensorRT engines: {why}",
              file=sys.stderr)
    if not use_trt and device not in ("auto", "cpu"):
        raise BackendError(f"--device {device}: the onnxruntime backend runs on the CPU (its CPU execution provider); "
                           f"use --device cpu, or engines for a GPU: {with_option(rebuild, '--backend', 'tensorrt')}")
    # auto verifies the engines even when it runs the ONNX graphs: a broken artifact is refused, not
    # half-run; --backend onnxruntime runs the ONNX graphs alone
    cfg, recorded = verify_artifact(path, manifest, engines=has_engine and backend != "onnxruntime")
    _warn_if_checkpoint_changed(manifest)
    _, specs = artifact_specs(manifest, options.batch)  # buffers at the batch asked for (checked above)
    if use_trt:
        from mirage.runtime.tensorrt import TensorRTBackend

        impl = TensorRTBackend(path, manifest, specs, device)
        return impl, cfg, specs, manifest
    impl = OrtBackend({g: path / m["onnx"] for g, m in manifest["graphs"].items()})
    for graph in specs:
        check_signature(graph, impl.signature(graph), recorded[graph], rebuild)
    return impl, cfg, specs, manifest


def batch_remedy(path: Path, manifest: dict, rebuild: str, batch: int) -> str:
    """How to run `batch` rows on an artifact that does not take them: its export again with the batch option its
    family has (a DiT: a static --batch; a U-Net: a dynamic batch up to --max-batch, its --batch kept as the
    optimum, so it runs its old batch too), or its own batch where the caller can choose one (mirage-serve)."""
    if CONFIG_FAMILIES[manifest.get("family", ModelConfig.family)].dynamic_batch:
        command = with_option(rebuild, "--max-batch", str(max(batch, manifest["batch"], manifest["max_batch"] or 0)))
    else:
        command = with_option(rebuild, "--batch", str(batch))
    serve = f"mirage-serve {shlex.quote(str(path))} --slots {manifest['max_batch'] or manifest['batch']}"
    return f"export it for a batch of {batch}: {command} (or serve it at its own: {serve})"


def _gpu_asked(device: str) -> bool:
    """auto runs an artifact's engines where a GPU is asked for, or (device auto) where one is present."""
    return device.startswith("cuda") or (device == "auto" and cuda_available())


def _warn_if_checkpoint_changed(manifest: dict) -> None:
    """The artifact is self-contained; a changed checkpoint only means a rebuild would differ."""
    if manifest["checkpoint"]["path"] is None:  # random weights (a DiT exported from a seed)
        return
    ckpt = Path(manifest["checkpoint"]["path"]) / "model.safetensors"
    if ckpt.is_file() and ckpt.stat().st_size < 1 << 30 and sha256_file(ckpt) != manifest["checkpoint"]["sha256"]:
        print(f"note: {ckpt} changed since this artifact was exported; the artifact runs the weights it was "
              "built from", file=sys.stderr)
