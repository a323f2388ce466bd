"""The artifact manifest: written by `mirage-export`, checked before any engine is loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mirage.runtime.graphs import MANIFEST


class EngineError(ValueError):
    """An engine or artifact that cannot be built or loaded here; one line that says what to do."""


REQUIRED = ("format", "mirage_version", "created", "model", "checkpoint", "precision", "temporal_attention", "graphs",
            "backend", "target", "plugin", "build_options", "build_seconds", "parity", "rebuild_command")
GRAPH_REQUIRED = ("onnx", "onnx_sha256", "inputs", "outputs", "engine", "engine_sha256", "layers")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, data: dict) -> Path:
    validate_manifest(data)
    path = Path(folder) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; build it with `mirage-export --checkpoint CKPT --out {folder}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: corrupt JSON ({e}); rebuild the artifact") from e
    validate_manifest(data)
    return data


def validate_manifest(m: dict) -> None:
    missing = [k for k in REQUIRED if k not in m]
    for graph, meta in (m.get("graphs") or {}).items():
        missing += [f"graphs.{graph}.{k}" for k in GRAPH_REQUIRED if k not in meta]
    if missing:
        raise EngineError(f"manifest is incomplete: missing {', '.join(missing)}")


def check_loadable(m: dict, backend_version: str, gpu_cc: str | None, plugin_path: str | None) -> None:
    """Refuse an engine built for another library version or GPU, naming the rebuild command."""
    rebuild = m.get("rebuild_command") or (
        f"mirage-export --checkpoint {m['checkpoint']['path']} --precision {m['precision']} "
        f"--backend {m['backend']['name']} --out DIR")
    built = m["backend"]
    if built.get("version") and built["version"] != backend_version:
        raise EngineError(f"engine built by {built['name']} {built['version']} but {backend_version} is installed; "
                          f"rebuild: {rebuild}")
    if gpu_cc:
        if built["name"] == "tensorrt-rtx" and gpu_cc == "sm90":
            raise EngineError("TensorRT-RTX does not run on Hopper (sm90); build with full TensorRT: "
                              + rebuild.replace("tensorrt-rtx", "tensorrt"))
        targets = [t.lower() for t in m.get("target", {}).get("compute_capabilities") or []]
        if targets and gpu_cc not in targets:
            command = rebuild.split(" --gpu ")[0] + f" --gpu {gpu_cc}"
            raise EngineError(f"engine targets {', '.join(targets)} but this GPU is {gpu_cc}; rebuild: {command}")
    plugin = m.get("plugin")
    if plugin:
        if not plugin_path or not Path(plugin_path).is_file():
            raise EngineError(f"engine needs the plugin library {plugin['path']}, which is missing")
        if sha256_file(plugin_path) != plugin["sha256"]:
            raise EngineError(f"plugin library {plugin_path} differs from the one the engine was built with; "
                              f"rebuild: {rebuild}")


def check_engine_file(path: str | Path, expected_sha256: str | None) -> None:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: engine file missing")
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise EngineError(f"{path}: corrupt or modified engine (hash differs from manifest.json); rebuild it")
