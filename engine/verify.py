"""Verify an artifact's files before anything runs them: every recorded hash, and every graph's
names, shapes and dtypes against the spec derived from the manifest's model config.

Hashing a multi-GB engine takes seconds, so a verified file's (size, mtime_ns, sha256) is kept in
a sidecar, `.verified.json`, beside it: later loads trust an unchanged size and mtime and hash
only what changed. A read-only folder is hashed every time (the sidecar is an optimisation).
"""
from __future__ import annotations

import json
from pathlib import Path

from mirage.core import graphs as G
from mirage.core.config import CONFIG_FAMILIES, ConfigError, ModelConfig, from_json
from mirage.engine.manifest import EngineError, rebuild_command, sha256_file

SIDECAR = ".verified.json"


def _sidecar(folder: Path) -> dict:
    try:
        return json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}


def verify_file(path: Path, expected: str | None, folder: Path, rebuild: str) -> None:
    """Refuse a missing file or one whose sha256 differs from the manifest's."""
    if not expected:
        raise EngineError(f"{path.name}: the manifest records no hash for it; rebuild: {rebuild}")
    if not path.is_file():
        raise EngineError(f"{path}: missing; rebuild: {rebuild}")
    stat, known = path.stat(), _sidecar(folder)
    entry = known.get(path.name)
    if entry and entry[:2] == [stat.st_size, stat.st_mtime_ns] and entry[2] == expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise EngineError(f"{path}: corrupt or modified (its sha256 differs from the manifest's); rebuild: {rebuild}")
    known[path.name] = [stat.st_size, stat.st_mtime_ns, actual]
    try:
        (folder / SIDECAR).write_text(json.dumps(known))
    except OSError:
        pass


def artifact_specs(manifest: dict, batch: int | None = None) -> tuple[ModelConfig, dict[str, G.GraphSpec]]:
    """The model config (of the manifest's family: a U-Net when it names none) and the specs of the graphs it holds,
    at `batch` (default: the batch it was exported at; a dynamic-batch artifact runs any up to its max)."""
    try:
        cfg = from_json(CONFIG_FAMILIES[manifest.get("family", "unet")], manifest["model"])
    except (ConfigError, TypeError) as e:
        raise EngineError(f"manifest: bad model config ({e})") from e
    try:
        specs = G.model_graphs(cfg, batch or manifest["batch"], manifest["max_batch"], manifest["precision"])
    except ValueError as e:
        raise EngineError(f"manifest: {e}") from e
    if (manifest.get("taehv") or {}).get("encoder") is False:  # exported from a TAEHV file without its encoder
        del specs[G.ENCODE]
    return cfg, specs


def verify_artifact(folder: Path, manifest: dict, engines: bool) -> tuple[ModelConfig, dict[str, G.GraphSpec]]:
    """Check the graph set and each graph's recorded I/O against the spec, then the ONNX (and,
    with `engines`, engine) hashes. Returns (config, specs)."""
    folder = Path(folder)
    rebuild = rebuild_command(manifest, folder)
    cfg, specs = artifact_specs(manifest)
    if set(manifest["graphs"]) != set(specs):
        raise EngineError(f"manifest lists graphs {sorted(manifest['graphs'])}, the model has {sorted(specs)}; "
                          f"rebuild: {rebuild}")
    for name, spec in specs.items():
        meta = manifest["graphs"][name]
        want_in, want_out = spec.io()
        if meta["inputs"] != want_in or meta["outputs"] != want_out:
            diff = _diff((meta["inputs"], meta["outputs"]), (want_in, want_out)) or "the order differs"
            raise EngineError(f"{name}: the manifest's inputs/outputs differ from what the model config implies "
                              f"({diff}); rebuild: {rebuild}")
        verify_file(folder / meta["onnx"], meta["onnx_sha256"], folder, rebuild)
        if engines and meta.get("engine_refused"):
            raise EngineError(f"{name}: the artifact has no engine for it ({meta['engine_refused']})")
        if engines:
            verify_file(folder / meta["engine"], meta["engine_sha256"], folder, rebuild)
    return cfg, specs


def check_signature(graph: str, actual: tuple[list[dict], list[dict]], spec: G.GraphSpec, rebuild: str,
                    source: str = "the graph file") -> None:
    """The I/O a loaded graph really has (ONNX Runtime's or TensorRT's view) against its spec, by
    name: the backends bind tensors by name, so only their order may differ."""
    have = tuple([{**x, "shape": [-1 if isinstance(d, str) else d for d in x["shape"]]} for x in xs] for xs in actual)
    diff = _diff(have, spec.io())
    if diff:
        raise EngineError(f"{graph}: {source}'s inputs/outputs differ from the manifest ({diff}); rebuild: {rebuild}")


def _diff(have: tuple[list[dict], list[dict]], want: tuple[list[dict], list[dict]]) -> str | None:
    """The first difference between two (inputs, outputs) pairs, in words; None when they agree."""
    modes = ("input", "output")
    found = {x["name"]: (mode, x) for mode, xs in zip(modes, have) for x in xs}
    for mode, ws in zip(modes, want):
        for w in ws:
            if w["name"] not in found:
                return f"no {mode} {w['name']!r}"
            h_mode, h = found[w["name"]]
            if h_mode != mode:
                return f"{w['name']} is an {h_mode} where an {mode} is expected"
            if h != w:
                return f"{w['name']}: {h['dtype']}{h['shape']} where {w['dtype']}{w['shape']} is expected"
    extra = sorted(set(found) - {w["name"] for ws in want for w in ws})
    return f"unexpected tensors {extra}" if extra else None
