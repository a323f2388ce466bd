"""Build an artifact directory from a checkpoint: ONNX graphs, parity, INT8, engines, manifest.

    DIR/manifest.json             everything needed to check an engine before loading it
    DIR/denoise.onnx              + context_encode.onnx (with .data side files when large)
    DIR/denoise.engine            + context_encode.engine (TensorRT backends only)
    DIR/denoise.layers.json       per-layer view of each engine
    DIR/timing.cache              full TensorRT only (TensorRT-RTX's timing cache is a no-op)

Stages, in order: export -> quantize (int8, fp8) -> parity -> build. Each reports to `progress`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shlex
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mirage import __version__
from mirage.core import graphs as G
from mirage.train.checkpoint import WEIGHTS, load_checkpoint
from mirage.core.config import to_json

from mirage.export.onnx_export import ExportError, ExportOptions, activation_range, export_graph, record_rollout_inputs
from mirage.export.parity import TOLERANCE, OrtGraphs, rollout_psnr, tensor_parity
from mirage.export.quantize import MODES as QUANTIZED, quantize_qdq

from mirage.engine.build import BuildOptions, build_engine, load_backend
from mirage.engine.compare import compare_engine, skip_reason
from mirage.engine.manifest import sha256_file, write_manifest

PRECISIONS = ("fp32", "fp16", *QUANTIZED)
BACKENDS = ("onnx", "tensorrt-rtx", "tensorrt")
FP8_TARGETS = ("sm89", "sm120")  # TensorRT-RTX targets with FP8 tensor cores (Ada, Blackwell)
FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class ArtifactOptions:
    precision: str = "fp16"  # fp32 | fp16 | int8 | fp8
    backend: str = "onnx"  # onnx (no engine) | tensorrt-rtx | tensorrt
    batch: int = 1  # batch of the graphs (with max_batch: TensorRT's optimal batch)
    max_batch: int | None = None  # None: static batch; else a dynamic batch dim in [1, max_batch]
    gpus: tuple[str, ...] = ()  # TensorRT-RTX compute-capability targets, e.g. ("sm89", "sm120"); () = its default
    calibration_frames: int = 8  # rollout frames whose inputs calibrate INT8/FP8 (x DDIM steps samples)
    parity_frames: int = 50  # length of the rollout-level parity check
    optimization_level: int = 3  # TensorRT builder optimization level (0-5)
    workspace_mb: int = 1024  # TensorRT workspace limit
    plugin_library: str | None = None  # TensorRT plugin .so to load before parsing
    temporal_attention: str = "onnx"  # onnx: stock ops / `Attention`; plugin: custom node for plugins_cpp


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def desc(values):
        return [{"name": v.name, "dtype": names[v.type.tensor_type.elem_type].lower(),
                 "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]} for v in values]

    return desc(model.graph.input), desc(model.graph.output)


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ExportError(f"{out}: output folder is not writable ({e.strerror})") from e


def rebuild_command(checkpoint: Path, out: Path, o: ArtifactOptions) -> str:
    cmd = ["mirage-export", "--checkpoint", str(checkpoint), "--precision", o.precision, "--backend", o.backend,
           "--out", str(out)]
    if o.gpus:
        cmd += ["--gpu", ",".join(o.gpus)]
    if o.plugin_library:
        cmd += ["--plugin-library", o.plugin_library]
    if o.temporal_attention != "onnx":
        cmd += ["--temporal-attention", o.temporal_attention]
    if o.batch != 1:
        cmd += ["--batch", str(o.batch)]
    if o.max_batch:
        cmd += ["--max-batch", str(o.max_batch)]
    return shlex.join(cmd)


def build_artifact(checkpoint: str | Path, out: str | Path, options: ArtifactOptions,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run every stage and write DIR/manifest.json; returns the manifest."""
    checkpoint, out, o = Path(checkpoint), Path(out), options
    if o.precision not in PRECISIONS:
        raise ExportError(f"precision {o.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if o.backend not in BACKENDS:
        raise ExportError(f"backend {o.backend!r}: choose one of {', '.join(BACKENDS)}")
    if o.precision == "fp8" and o.backend == "tensorrt-rtx":
        lacking = [g for g in o.gpus if g not in FP8_TARGETS]
        if lacking:
            raise ExportError(f"--precision fp8: {', '.join(lacking)} have no FP8 tensor cores; "
                              f"use --gpu {','.join(FP8_TARGETS)} (or a subset)")
        o = dataclasses.replace(o, gpus=o.gpus or FP8_TARGETS)  # the default set includes sm80/sm86
    plugin_mode = o.temporal_attention == "plugin"
    if plugin_mode and o.precision in QUANTIZED:
        raise ExportError("--temporal-attention plugin is for fp32/fp16; INT8/FP8 graphs use the stock-op attention")
    if plugin_mode and o.backend != "onnx" and not o.plugin_library:
        raise ExportError("--temporal-attention plugin needs --plugin-library (the plugins_cpp TensorRT plugin .so) "
                          "to build engines")
    model, meta = load_checkpoint(checkpoint)
    _writable(out)
    started = time.perf_counter()
    torch.manual_seed(0)

    progress("recording rollout inputs")
    calib = record_rollout_inputs(model, o.calibration_frames, seed=0)
    check = record_rollout_inputs(model, 3, seed=1)  # parity on inputs the calibration never saw

    files: dict[str, Path] = {g: out / G.onnx_file(g) for g in G.GRAPHS}
    for graph in G.GRAPHS:
        progress(f"export {graph} ({o.precision})")
        if o.precision in QUANTIZED:
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = export_graph(model, graph, Path(tmp) / G.onnx_file(graph),
                                    ExportOptions("fp32", o.batch, o.max_batch, decompose_attention=False))
                progress(f"quantize {graph} ({o.precision.upper()} Q/DQ, {len(calib[graph])} calibration samples)")
                quantize_qdq(fp32, files[graph], calib[graph], o.precision)
        else:
            export_graph(model, graph, files[graph], ExportOptions(o.precision, o.batch, o.max_batch,
                                                                   temporal_attention=o.temporal_attention))

    progress("parity vs. PyTorch (ONNX Runtime, CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        checked = files
        if plugin_mode:  # ONNX Runtime has no kernel for the plugin node: check the stock-op twin
            checked = {g: export_graph(model, g, Path(tmp) / G.onnx_file(g),
                                          ExportOptions(o.precision, o.batch, o.max_batch))
                       for g in G.GRAPHS}
        ort_graphs = OrtGraphs(model.cfg, checked)
        tensors = tensor_parity(model, ort_graphs, check)
        frames = rollout_psnr(model, ort_graphs, o.parity_frames)
    parity = {"tolerance_rel": TOLERANCE[o.precision], "tensors": tensors, "rollout": frames,
              "passed": all(t["rel"] <= TOLERANCE[o.precision] for t in tensors.values()),
              "graphs_checked": "stock-op export (the plugin node has no ONNX Runtime kernel)" if plugin_mode
              else "the exported graphs"}
    if o.precision == "fp16":
        peak = activation_range(model, calib)
        parity["fp16_activation_peak"] = peak
        parity["fp16_headroom"] = FP16_MAX / max(peak, 1e-12)

    graphs_meta: dict[str, dict] = {}
    for graph in G.GRAPHS:
        inputs, outputs = _io(files[graph])
        graphs_meta[graph] = {"onnx": files[graph].name, "onnx_sha256": sha256_file(files[graph]),
                              "inputs": inputs, "outputs": outputs, "engine": None, "engine_sha256": None,
                              "layers": None}

    backend_meta: dict = {"name": o.backend, "version": None}
    build_meta: dict = {}
    plugin = None
    if o.backend != "onnx":
        trt = load_backend(o.backend)
        backend_meta["version"] = trt.__version__
        bopts = BuildOptions(backend=o.backend, optimization_level=o.optimization_level, workspace_mb=o.workspace_mb,
                             plugin_library=o.plugin_library,
                             **({"compute_capabilities": tuple(o.gpus)} if o.gpus else {}))
        build_meta = dataclasses.asdict(bopts)
        for graph in G.GRAPHS:
            progress(f"build {graph} engine ({o.backend} {trt.__version__})")
            engine = out / G.engine_file(graph)
            # a dynamic batch (-1) gets the profile min 1, opt batch, max max_batch
            shapes = {x["name"]: tuple(tuple(b if d == -1 else d for d in x["shape"]) for b in (1, o.batch, o.max_batch))
                      for x in graphs_meta[graph]["inputs"] if -1 in x["shape"]}
            summary = build_engine(files[graph], engine, bopts, timing_cache_path=out / G.TIMING_CACHE, log=progress,
                                   shapes=shapes or None)
            graphs_meta[graph].update(engine=engine.name, engine_sha256=sha256_file(engine),
                                      layers=G.layers_file(graph), build=summary)
        if o.plugin_library:
            plugin = {"path": str(Path(o.plugin_library).resolve()), "sha256": sha256_file(Path(o.plugin_library))}
        reason = skip_reason(o.backend)
        for graph in G.GRAPHS:
            if reason:
                graphs_meta[graph]["polygraphy"] = {"skipped": reason}
                continue
            progress(f"polygraphy: {graph} engine vs. ONNX Runtime")
            feeds = [{k: v.numpy() for k, v in x.items()} for x in check[graph]]
            graphs_meta[graph]["polygraphy"] = compare_engine(files[graph], out / G.engine_file(graph), feeds,
                                                              o.precision)

    manifest = {
        "format": 1,
        "mirage_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": to_json(model.cfg),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint / WEIGHTS),
                       "step": meta.get("step")},
        **({"sampling_steps": meta["sampling_steps"]} if meta.get("sampling_steps") else {}),  # a student's steps
        "precision": o.precision,
        "temporal_attention": o.temporal_attention,
        "batch": o.batch,
        "max_batch": o.max_batch,
        "graphs": graphs_meta,
        "backend": backend_meta,
        # What the engines were really built for: RTX's targets, or full TensorRT's build GPU.
        "target": {"compute_capabilities": graphs_meta[G.DENOISE].get("build", {}).get("compute_capabilities", [])},
        "plugin": plugin,
        "build_options": build_meta,
        "build_seconds": time.perf_counter() - started,
        "parity": parity,
        "rebuild_command": rebuild_command(checkpoint, out, o),
    }
    write_manifest(out, manifest)
    return manifest


def artifact_files(out: str | Path) -> list[tuple[str, int]]:
    out = Path(out)
    return sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file() and not p.name.startswith("."))

