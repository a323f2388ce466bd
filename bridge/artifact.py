"""Build an artifact directory from a checkpoint: ONNX graphs, parity, INT8, engines, manifest.

    DIR/manifest.json             everything needed to check an engine before loading it
    DIR/denoise.onnx              + context_encode.onnx (with .data side files when large)
    DIR/denoise.engine            + context_encode.engine (TensorRT backends only)
    DIR/denoise.layers.json       per-layer view of each engine
    DIR/timing.cache              full TensorRT only (TensorRT-RTX's timing cache is a no-op)
    DIR/<plugin>.so               a copy of --plugin-library, which the engines need

One validation step (`check_options`, before any work), then the stages of `_build` in order: export
(-> quantize, int8/fp8) -> parity -> graph entries -> engines -> polygraphy -> manifest. Each reports
to `progress`.
Everything is written into a temporary sibling folder that replaces DIR only when complete: a
failed or interrupted export leaves the previous artifact as it was and no stray files.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mirage import __version__
from mirage.core import graphs as G
from mirage.core.config import to_json
from mirage.core.device import missing_gpu
from mirage.core.files import as_created
from mirage.core.graphs import PRECISIONS
from mirage.core.tolerances import PARITY as TOLERANCE
from mirage.engine.build import BuildOptions, build_engine, load_backend
from mirage.bridge.compare import compare_engine, skip_reason
from mirage.engine.manifest import BACKENDS, FP8_TARGETS, RTX_TARGETS, export_command, sha256_file, write_manifest
from mirage.export.onnx_export import ExportError, ExportOptions, activation_range, export_graph, record_rollout_inputs
from mirage.export.parity import rollout_psnr, tensor_parity
from mirage.export.quantize import MODES as QUANTIZED, quantize_qdq
from mirage.train.checkpoint import WEIGHTS, check_not_dit, load_checkpoint
from mirage.train.codec import load_codec

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
    # TensorRT workspace limit; None: 1024 MiB for a U-Net, 4096 for a DiT (wan-1.3b's dit_step asks 3.4 GiB)
    workspace_mb: int | None = None
    plugin_library: str | None = None  # TensorRT plugin .so to load before parsing
    temporal_attention: str = "onnx"  # onnx: stock ops / `Attention`; plugin: custom node for plugins_cpp
    allow_parity_failure: bool = False  # write the artifact even when parity fails (recorded in the manifest)


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) the ONNX file declares, in the manifest's form."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def desc(values):
        return [{"name": v.name, "dtype": G.ONNX_DTYPES.get(names[v.type.tensor_type.elem_type].lower(), "?"),
                 "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]}
                for v in values]

    return desc(model.graph.input), desc(model.graph.output)


def check_options(o: ArtifactOptions, out: Path) -> ArtifactOptions:
    """The one validation step: refuse what cannot build (or would overwrite what is not an artifact)
    before any work is done; returns the options with defaults resolved."""
    if o.precision not in PRECISIONS:
        raise ExportError(f"precision {o.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if o.backend not in BACKENDS:
        raise ExportError(f"backend {o.backend!r}: choose one of {', '.join(BACKENDS)}")
    if o.max_batch is not None and not 1 <= o.batch <= o.max_batch:
        raise ExportError(f"--batch {o.batch} is larger than --max-batch {o.max_batch}")
    if o.backend == "tensorrt-rtx":
        unknown = [g for g in o.gpus if g not in RTX_TARGETS]
        if unknown:
            raise ExportError(f"--gpu {','.join(unknown)}: TensorRT-RTX builds for {', '.join(RTX_TARGETS)}; "
                              "for other GPUs build with --backend tensorrt on that GPU")
    if o.precision == "fp8" and o.backend == "tensorrt-rtx":
        lacking = [g for g in o.gpus if g not in FP8_TARGETS]
        if lacking:
            raise ExportError(f"--precision fp8: {', '.join(lacking)} have no FP8 tensor cores; "
                              f"use --gpu {','.join(FP8_TARGETS)} (or a subset)")
        o = dataclasses.replace(o, gpus=o.gpus or FP8_TARGETS)  # the default set includes sm80/sm86
    plugin_mode = o.temporal_attention == "plugin"
    if plugin_mode and o.precision in QUANTIZED:
        raise ExportError("--temporal-attention plugin is for fp32/fp16; INT8/FP8 graphs use the stock-op attention")
    if plugin_mode and o.backend == "tensorrt-rtx":
        # verified: TensorRT-RTX 1.7's ONNX parser aborts the whole process on a plugin node
        raise ExportError("TensorRT-RTX supports no plugins: build --temporal-attention plugin engines with "
                          "--backend tensorrt, or drop --temporal-attention plugin")
    if plugin_mode and o.backend != "onnx" and not o.plugin_library:
        raise ExportError("--temporal-attention plugin needs --plugin-library (the plugins_cpp TensorRT plugin .so) "
                          "to build engines")
    if o.backend != "onnx":
        load_backend(o.backend)  # not installed: said now, not after a minute of export and parity
    no_gpu = missing_gpu(0) if o.backend == "tensorrt" else None  # full TensorRT builds for the GPU it runs on
    if no_gpu:
        raise ExportError(f"--backend tensorrt builds on an NVIDIA GPU: {no_gpu}; --backend tensorrt-rtx builds "
                          "without one")
    check_out(out)
    return o


def build_artifact(checkpoint: str | Path, out: str | Path, options: ArtifactOptions,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run every stage in a staging folder, then put it in place of `out`; returns the manifest."""
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    if options.precision == "bf16":
        raise ExportError("--precision bf16 exports a DiT (--dit NAME); a U-Net exports fp32, fp16, int8 or fp8")
    o = check_options(options, out)
    check_not_dit(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    return staged(out, lambda stage: _build(model, meta, checkpoint, out, stage, o, progress))


def check_out(out: Path) -> None:
    """Refuse, before any work, an output path that is something else than an artifact (or empty)."""
    replaceable = out.is_dir() and ((out / G.MANIFEST).is_file() or not any(out.iterdir()))
    if out.exists() and not replaceable:  # such a path is never replaced
        raise ExportError(f"{out} exists and is not a Mirage artifact; choose another --out or remove it")


def staged(out: Path, build: Callable[[Path], dict]) -> dict:
    """Run `build(stage)` in a temporary sibling folder, then put it in place of `out`; returns its manifest."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        as_created(stage)  # mkdtemp's 0700 would stay on the artifact
    except OSError as e:
        raise ExportError(f"{out}: output folder is not writable ({e.strerror})") from e
    try:
        manifest = build(stage)
        _replace(stage, out)
    except BaseException:  # failures and Ctrl-C alike: the previous artifact stays, the stage goes
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _replace(stage: Path, out: Path) -> None:
    """Swap the finished stage in for `out` (two renames; the old folder is removed after)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(model, meta: dict, checkpoint: Path, out: Path, stage: Path, o: ArtifactOptions, progress) -> dict:
    """The stages in order, each writing into `stage`; the options were checked by `check_options`."""
    started = time.perf_counter()
    torch.manual_seed(0)
    specs = G.model_graphs(model.cfg, o.batch, o.max_batch, o.precision)
    progress("recording rollout inputs")
    calib = record_rollout_inputs(model, o.calibration_frames, seed=0)
    check = record_rollout_inputs(model, 3, seed=1)  # parity on inputs the calibration never saw
    codec = load_codec(model.cfg) if model.cfg.latent else None

    files = _export(model, specs, stage, calib, codec, o, progress)
    parity = _parity(model, files, calib, check, codec, o, progress)
    graphs = {graph: graph_record(specs[graph], files[graph]) for graph in specs}
    engines: dict = {"backend": {"name": o.backend, "version": None}, "plugin": None, "build_options": {}}
    if o.backend != "onnx":
        engines = _engines(specs, files, stage, graphs, o, progress)
        _compare_engines(specs, files, check, stage, graphs, o, progress)
    manifest = _manifest(model, meta, checkpoint, out, o, graphs, engines, parity, time.perf_counter() - started)
    write_manifest(stage, manifest)
    return manifest


def _export(model, specs: dict, stage: Path, calib: dict, codec, o: ArtifactOptions, progress) -> dict[str, Path]:
    """Each graph as ONNX in `stage`; INT8/FP8 graphs are exported in fp32, then quantized (Q/DQ)."""
    files: dict[str, Path] = {g: stage / G.onnx_file(g) for g in specs}
    for graph in specs:
        progress(f"export {graph} ({o.precision})")
        if o.precision in QUANTIZED and graph in G.GRAPHS:
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = export_graph(model, graph, Path(tmp) / G.onnx_file(graph),
                                    ExportOptions("fp32", o.batch, o.max_batch, decompose_attention=False))
                progress(f"quantize {graph} ({o.precision.upper()} Q/DQ, {len(calib[graph])} calibration samples)")
                quantize_qdq(fp32, files[graph], calib[graph], o.precision)
        else:  # 8-bit artifacts keep the autoencoder in fp32 (their graphs' I/O is fp32)
            precision = o.precision if o.precision in ("fp32", "fp16") else "fp32"
            export_graph(model, graph, files[graph], ExportOptions(precision, o.batch, o.max_batch,
                                                                   temporal_attention=o.temporal_attention), codec)
    return files


def _parity(model, files: dict[str, Path], calib: dict, check: dict, codec, o: ArtifactOptions, progress) -> dict:
    """The exported graphs against PyTorch (tensors, then a rollout); a failure stops the build unless
    --allow-parity-failure, which the returned record keeps."""
    progress("parity vs. PyTorch (ONNX Runtime, CPU)")
    plugin_mode = o.temporal_attention == "plugin"
    with tempfile.TemporaryDirectory() as tmp:
        checked = files
        if plugin_mode:  # ONNX Runtime has no kernel for the plugin node: check the stock-op twin
            checked = {**files, **{g: export_graph(model, g, Path(tmp) / G.onnx_file(g),
                                                   ExportOptions(o.precision, o.batch, o.max_batch))
                                   for g in G.GRAPHS}}
        tensors = tensor_parity(model, checked, check, codec)
        frames = rollout_psnr(model, checked, o.parity_frames)
    parity = parity_verdict(tensors, frames, o, "stock-op export (the plugin node has no ONNX Runtime kernel)"
                            if plugin_mode else "the exported graphs")
    if o.precision == "fp16":
        peak = activation_range(model, calib, codec)
        parity["fp16_activation_peak"] = peak
        parity["fp16_headroom"] = FP16_MAX / max(peak, 1e-12)
    return parity


def graph_record(spec: G.GraphSpec, onnx_file: Path) -> dict:
    """A graph's manifest entry before any engine, once its ONNX file is checked against the spec."""
    inputs, outputs = spec.io()
    if _io(onnx_file) != (inputs, outputs):  # the exporter must have written what the spec says
        raise ExportError(f"{spec.name}: the exported ONNX graph's inputs/outputs {_io(onnx_file)} differ from "
                          f"its spec {(inputs, outputs)}")
    return {"onnx": onnx_file.name, "onnx_sha256": sha256_file(onnx_file), "inputs": inputs, "outputs": outputs,
            "engine": None, "engine_sha256": None, "layers": None}


def parity_verdict(tensors: dict, frames: dict, o: ArtifactOptions, checked: str) -> dict:
    """The manifest's parity record; refuses (nothing is written) when it fails, unless allowed."""
    passed = frames["finite"] and all(t["rel"] <= TOLERANCE[o.precision] for t in tensors.values())
    if not passed and not o.allow_parity_failure:
        worst = ", ".join(f"{k} rel {t['rel']:.3g}" for k, t in tensors.items())
        raise ExportError(f"parity failed ({worst} against tolerance {TOLERANCE[o.precision]:g}; rollout PSNR "
                          f"{frames['psnr_mean_db']:.1f} dB); nothing was written. Check the checkpoint, or pass "
                          "--allow-parity-failure to write it anyway (recorded in the manifest)")
    return {"tolerance_rel": TOLERANCE[o.precision], "tensors": tensors, "rollout": frames, "passed": passed,
            "override": not passed and o.allow_parity_failure, "graphs_checked": checked}


def _engines(specs: dict, files: dict[str, Path], stage: Path, graphs: dict[str, dict], o: ArtifactOptions,
             progress) -> dict:
    """Build each graph's engine into `stage` (recorded in `graphs`) and copy the plugin library beside
    them; returns the manifest's backend, plugin and build_options entries."""
    trt = load_backend(o.backend)
    bopts = BuildOptions(backend=o.backend, optimization_level=o.optimization_level, workspace_mb=o.workspace_mb or 1024,
                         plugin_library=o.plugin_library, timing_cache=o.backend == "tensorrt",
                         **({"compute_capabilities": tuple(o.gpus)} if o.gpus else {}))
    for graph in specs:
        progress(f"build {graph} engine ({o.backend} {trt.__version__})")
        engine = stage / G.engine_file(graph)
        summary = build_engine(files[graph], engine, bopts, timing_cache_path=stage / G.TIMING_CACHE,
                               log=progress, shapes=specs[graph].profile())
        graphs[graph].update(engine=engine.name, engine_sha256=sha256_file(engine),
                             layers=G.layers_file(graph), build=summary)
    plugin = None
    if o.plugin_library:  # a copy beside the engines, found relative to the artifact: the folder can move
        lib = Path(shutil.copy2(o.plugin_library, stage / Path(o.plugin_library).name))
        plugin = {"path": lib.name, "sha256": sha256_file(lib)}
    return {"backend": {"name": o.backend, "version": trt.__version__}, "plugin": plugin,
            "build_options": dataclasses.asdict(bopts)}


def _compare_engines(specs: dict, files: dict[str, Path], check: dict, stage: Path, graphs: dict[str, dict],
                     o: ArtifactOptions, progress) -> None:
    """Polygraphy: each engine against ONNX Runtime on the parity inputs, or why that was skipped."""
    reason = skip_reason(o.backend)
    for graph in specs:
        if reason:
            graphs[graph]["polygraphy"] = {"skipped": reason}
            continue
        progress(f"polygraphy: {graph} engine vs. ONNX Runtime")
        feeds = [{k: v.numpy() for k, v in x.items()} for x in check[graph]]
        graphs[graph]["polygraphy"] = compare_engine(files[graph], stage / G.engine_file(graph), feeds, o.precision)


def _manifest(model, meta: dict, checkpoint: Path, out: Path, o: ArtifactOptions, graphs: dict[str, dict],
              engines: dict, parity: dict, seconds: float) -> dict:
    options = {**dataclasses.asdict(o), "gpus": list(o.gpus)}
    return {
        "format": 2,
        "mirage_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": to_json(model.cfg),
        "batch": o.batch,
        "max_batch": o.max_batch,
        "options": options,
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint / WEIGHTS),
                       "step": meta.get("step")},
        **({"sampling_steps": meta["sampling_steps"]} if meta.get("sampling_steps") else {}),  # a student's steps
        "precision": o.precision,
        "temporal_attention": o.temporal_attention,
        "graphs": graphs,
        "backend": engines["backend"],
        # What the engines were really built for: RTX's targets, or full TensorRT's build GPU.
        "target": {"compute_capabilities": graphs[G.DENOISE].get("build", {}).get("compute_capabilities", [])},
        "plugin": engines["plugin"],
        "build_options": engines["build_options"],
        "build_seconds": seconds,
        "parity": parity,
        "rebuild_command": export_command(checkpoint, out, options),
    }


def artifact_files(out: str | Path) -> list[tuple[str, int]]:
    out = Path(out)
    return sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
