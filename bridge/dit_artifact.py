"""A DiT artifact: the chunk-causal video DiT's graphs as ONNX, their parity, TensorRT engines, manifest.

    DIR/manifest.json                 as the U-Net's (engine.manifest), with "family": "dit" and the DiTConfig
    DIR/dit_text.onnx                 + dit_step.onnx, dit_cache_write.onnx (see mirage.core.graphs)
                                      + encode.onnx, decode.onnx: a config on a per-frame autoencoder's, or
                                        TAEHV's (--decoder FILE: the config's codec "taehv", their state
                                        explicit; encode only when the file has the encoder; the manifest's
                                        `taehv` names the file, its sha256 and whether it encodes)
    DIR/dit_step.engine               + the others' (TensorRT backends), each with its .layers.json

Stages: record a PyTorch rollout -> export (fp8: the block graphs quantized, calibrated on a second recorded
rollout; each graph's entry says what it holds) -> parity (ONNX Runtime vs PyTorch, per tensor and a
rollout's PSNR; bf16: on the graphs' widened twins, as `parity.graphs_checked` says) -> engines. A graph
the TensorRT backend refuses to parse or build does not stop the others: the manifest records
`engine_refused` (which stage and the parser's/builder's words) for it, progress says so, and
`refused_engines` lists them. Weights: a published checkpoint
(mirage.model.wan_checkpoint.load_dit, its file hashes recorded) or random ones from a seed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shlex
import time
from pathlib import Path
from typing import Callable

import torch

from mirage import __version__
from mirage.core import graphs as G
from mirage.core.config import DiTConfig, to_json
from mirage.core.dit_step import frames_are
from mirage.engine.build import BuildOptions, build_engine, load_backend
from mirage.engine.manifest import EngineError, sha256_file, write_manifest
from mirage.export.bf16 import parity_graphs
from mirage.export.dit_export import (dit_activation_range, dit_rollout_psnr, dit_specs, dit_tensor_parity,
                                      export_dit_graph, export_dit_qdq, graph_precision, record_dit_calls)
from mirage.export.onnx_export import ExportError, ExportOptions
from mirage.model.dit import WanDiT
from mirage.model.taehv import Taehv, TaehvDecoder
from mirage.model.wan_checkpoint import load_dit

from .artifact import FP16_MAX, ArtifactOptions, check_options, graph_record, parity_verdict, staged
from .pipeline import load_runtime_codec

DIT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


def dit_model(cfg: DiTConfig, weights: str | Path | None, seed: int = 0) -> tuple[WanDiT, dict]:
    """The model (fp32, CPU) and the manifest's `checkpoint` record: a checkpoint's path, layout and file
    hashes, or the seed of random weights."""
    if weights is not None:
        model, info = load_dit(weights, cfg)
        return model, {"path": str(Path(weights).resolve()), "sha256": ",".join(info.files.values()),
                       "layout": info.layout, "files": info.files}
    torch.manual_seed(seed)
    return WanDiT(cfg).eval().requires_grad_(False), {"path": None, "sha256": None, "random_seed": seed}


def dit_export_command(cfg: DiTConfig, weights: str | Path | None, out: Path, o: ArtifactOptions,
                       decoder: str | Path | None = None) -> str:
    cmd = ["mirage-export", "--dit", cfg.name, *(["--dit-weights", str(Path(weights).resolve())] if weights
                                                 else ["--random-weights"]),
           *(["--decoder", str(Path(decoder).resolve())] if decoder else []),
           "--out", str(out), "--precision", o.precision, "--backend", o.backend]
    cmd += ["--gpu", ",".join(o.gpus)] if o.gpus else []
    cmd += ["--batch", str(o.batch)] if o.batch != 1 else []
    cmd += ["--parity-frames", str(o.parity_frames)] if o.parity_frames != ArtifactOptions.parity_frames else []
    calibrated = o.precision == "fp8" and o.calibration_frames != ArtifactOptions.calibration_frames
    cmd += ["--calib-frames", str(o.calibration_frames)] if calibrated else []
    return shlex.join(cmd + (["--allow-parity-failure"] if o.allow_parity_failure else []))


def check_dit_options(o: ArtifactOptions, out: Path) -> ArtifactOptions:
    """The U-Net's checks (the output folder's too), then what the DiT's export does not have yet (said,
    not ignored)."""
    o = check_options(o, out)
    if o.precision not in DIT_PRECISIONS:
        raise ExportError(f"--precision {o.precision}: the DiT exports {', '.join(DIT_PRECISIONS)} (INT8 Q/DQ is "
                          "the U-Net's)")
    if o.max_batch is not None:
        raise ExportError("--max-batch: the DiT's graphs have a static batch (give --batch)")
    if o.temporal_attention != "onnx" or o.plugin_library:
        raise ExportError("--temporal-attention / --plugin-library are the U-Net's; the DiT uses stock ONNX ops")
    return o


def build_dit_artifact(cfg: DiTConfig, out: str | Path, options: ArtifactOptions, weights: str | Path | None = None,
                       seed: int = 0, progress: Callable[[str], None] = lambda s: None,
                       decoder: str | Path | None = None) -> dict:
    """Export `cfg` with `weights` (None: random from `seed`) into `out`, with `decoder` (a TAEHV file, as
    mirage-run's --decoder) its codec's graphs; returns the manifest."""
    out = Path(out).resolve()
    o = check_dit_options(options, out)
    exported, taehv = taehv_config(cfg, decoder)  # a bad --decoder is refused before the DiT loads
    model, checkpoint = dit_model(cfg, weights, seed)
    model.cfg = exported
    codec = None if taehv is None else {"file": Path(decoder).name, "sha256": sha256_file(Path(decoder)),
                                        "encoder": isinstance(taehv, Taehv)}
    return staged(out, lambda stage: _build(model, checkpoint, dit_export_command(cfg, weights, out, o, decoder),
                                            stage, o, progress, taehv, codec))


def taehv_config(cfg: DiTConfig, decoder: str | Path | None) -> tuple[DiTConfig, TaehvDecoder | None]:
    """(the config the graphs are exported for, the TAEHV) of a --decoder file (None: `cfg`, none; a Wan VAE folder
    is refused): `cfg` with the codec "taehv" (a ConfigError names a config TAEHV cannot code). The model keeps
    loading with `cfg`, as its checkpoint records it."""
    if decoder is None:
        return cfg, None
    return dataclasses.replace(cfg, codec="taehv"), load_runtime_codec(decoder)


def _build(model: WanDiT, checkpoint: dict, command: str, stage: Path, o: ArtifactOptions, progress,
           taehv: TaehvDecoder | None, codec: dict | None) -> dict:
    started = time.perf_counter()
    cfg = model.cfg
    specs = dit_specs(cfg, o.batch, o.precision, taehv)
    progress("recording a PyTorch rollout (inputs of each graph)")
    calls = record_dit_calls(model, blocks=max(2, cfg.window_frames // cfg.block_frames + 1), batch=o.batch,
                             taehv=taehv)
    files = {g: stage / G.onnx_file(g) for g in specs}
    holds = _export(model, specs, files, calls, o, progress, taehv)

    progress("parity vs. PyTorch (ONNX Runtime, CPU)")
    with parity_graphs(files, o.precision) as (checked_files, checked):  # bf16: twins ONNX Runtime can run
        tensors = dit_tensor_parity(model, checked_files, calls, o.precision, taehv)
        frames = dit_rollout_psnr(model, checked_files, o.precision, o.parity_frames, batch=o.batch, taehv=taehv)
    parity = parity_verdict(tensors, frames, o, checked)

    if o.precision == "fp16":
        parity["fp16_activation_peak"] = dit_activation_range(model, calls, taehv)
        parity["fp16_headroom"] = FP16_MAX / max(parity["fp16_activation_peak"], 1e-12)

    graphs_meta = {graph: {**graph_record(specs[graph], files[graph]), "onnx_bytes": files[graph].stat().st_size,
                           "holds": holds[graph]} for graph in specs}

    backend_meta: dict = {"name": o.backend, "version": None}
    build_meta: dict = {}
    if o.backend != "onnx":
        trt = load_backend(o.backend)
        backend_meta["version"] = trt.__version__
        bopts = BuildOptions(backend=o.backend, optimization_level=o.optimization_level, workspace_mb=o.workspace_mb or 4096,
                             timing_cache=o.backend == "tensorrt",
                             **({"compute_capabilities": tuple(o.gpus)} if o.gpus else {}))
        build_meta = dataclasses.asdict(bopts)
        for graph in specs:
            progress(f"build {graph} engine ({o.backend} {trt.__version__})")
            engine = stage / G.engine_file(graph)
            try:
                summary = build_engine(files[graph], engine, bopts, timing_cache_path=stage / G.TIMING_CACHE,
                                       log=progress)
            except EngineError as e:  # one refused graph is recorded; the others still build
                graphs_meta[graph]["engine_refused"] = str(e)
                progress(f"  REFUSED {graph}: {e}")
                continue
            graphs_meta[graph].update(engine=engine.name, engine_sha256=sha256_file(engine),
                                      layers=G.layers_file(graph), build=summary)

    built = [m["build"] for m in graphs_meta.values() if "build" in m]
    manifest = {
        "format": 2,
        "mirage_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "family": cfg.family,
        "model": to_json(cfg),
        "batch": o.batch,
        "max_batch": None,
        "options": {**dataclasses.asdict(o), "gpus": list(o.gpus)},
        "checkpoint": checkpoint,
        "taehv": codec,  # the TAEHV file its codec graphs were exported from (None: none)
        "precision": o.precision,
        "temporal_attention": o.temporal_attention,
        "graphs": graphs_meta,
        "frames": frames_are(specs),  # what the runtime's frames show: decoded video, or the latents' preview
        "backend": backend_meta,
        "target": {"compute_capabilities": built[0].get("compute_capabilities", []) if built else []},
        "plugin": None,
        "build_options": build_meta,
        "build_seconds": time.perf_counter() - started,
        "parity": parity,
        "rebuild_command": command,
    }
    write_manifest(stage, manifest)
    return manifest


def _export(model: WanDiT, specs: dict, files: dict[str, Path], calls, o: ArtifactOptions, progress,
            taehv: TaehvDecoder | None) -> dict[str, str]:
    """Each graph as ONNX; returns what each holds, as its manifest entry says. fp8: the block graphs as
    ModelOpt Q/DQ calibrated on a rollout the parity never sees (seed 2), dit_text and the autoencoder's in fp32."""
    holds = {}
    calibration = record_dit_calls(model, blocks=len(calls[G.DIT_CACHE_WRITE]), seed=2, batch=o.batch, taehv=taehv) \
        if o.precision == "fp8" else None
    for graph in specs:
        if calibration is not None and graph in (G.DIT_STEP, G.DIT_CACHE_WRITE):
            samples = calibration[graph][:o.calibration_frames * model.cfg.steps]
            progress(f"export {graph} (fp32) and quantize (FP8 Q/DQ, {len(samples)} calibration feeds)")
            export_dit_qdq(model, graph, files[graph], o.batch, samples)
            holds[graph] = f"fp8 e4m3 Q/DQ (ModelOpt, {len(samples)} calibration feeds; the rest fp16)"
        else:
            precision = graph_precision(graph, o.precision)
            progress(f"export {graph} ({precision})")
            export_dit_graph(model, graph, files[graph], ExportOptions(precision, o.batch), calls[graph][0], taehv)
            holds[graph] = "bf16 (float32 I/O, cast inside)" if precision == "bf16" else precision
    return holds


def refused_engines(manifest: dict) -> dict[str, str]:
    """Graph -> why the backend refused its engine."""
    return {g: m["engine_refused"] for g, m in manifest["graphs"].items() if m.get("engine_refused")}
