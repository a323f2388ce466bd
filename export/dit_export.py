"""Export the DiT's graphs (dit_text, dit_step, dit_cache_write; see mirage.core.graphs) to ONNX and
check them against PyTorch.

The modules are mirage.model.dit_graphs.DiTGraph, traced by onnx_export's dynamo machinery at the
spec's fixed shapes (weights over 1 GiB go to a side file: wan-1.3b's do). Precisions as for the U-Net:
fp32 decomposes attention into MatMul/Softmax (TensorRT-RTX has no fp32 kernel for opset-23
`Attention`), fp16 and bf16 keep `Attention` (bf16 behind float32 I/O, see export/bf16.py); fp8
(`export_dit_qdq`) exports the block graphs in fp32 with
`Attention` kept and has ModelOpt put FP8 E4M3 Q/DQ on them, calibrated on the feeds of a recorded rollout
(everything it leaves unquantized becomes fp16; the graphs' I/O stays fp32), while `dit_text`, which runs
once per prompt, stays fp32.

A config on a per-frame autoencoder (DiTConfig.autoencoder) adds its `encode` / `decode` graphs, traced from
mirage.model.latent.BlockCodec by the U-Net's codec module (onnx_export.graph_module), in fp32 or fp16 (8-bit
artifacts keep them fp32, as the U-Net's): their recorded calls encode blocks of a synthetic clip and decode
the latents that gives. A TAEHV (`taehv`, DiTConfig.codec "taehv") adds its graphs the same way, from
mirage.model.taehv.TaehvBlockCodec, their state explicit (`encode` only when the file has the encoder): a
temporal codec's calls depend on what it saw, so they are recorded in the runtime's own rollout, video-to-video
on a synthetic clip where it can encode (every graph's calls from one rollout, a fresh row first).

Rollouts run the runtime's own block loop (mirage.runtime.pipeline.Pipeline: core.dit_step.BlockUnit through
CpuExecution, its counter-based noise): recorded on the PyTorch backend (model.dit_backend), checked on ONNX
Runtime. Parity: per tensor on the inputs of a recorded PyTorch rollout (‖out − ref‖ / ‖ref‖ per output),
and per latent frame over a whole rollout: the runtime on ONNX Runtime against BlockStepper (PyTorch fp32,
in-place cache) given the noise the runtime drew and the same prompt, scored by PSNR with the reference
rollout's peak-to-peak range as the peak (latents are not in [-1, 1]); with a decoder, also the video frames
each decodes them to (the runtime's decode graph on its rollout against PyTorch's decode of the reference).
"""
from __future__ import annotations

import contextlib
import copy
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mirage.core import graphs as G
from mirage.core.config import PipelineOptions
from mirage.core.dit_step import block_inputs
from mirage.core.metrics import latent_psnr
from mirage.core.ort import OrtBackend
from mirage.core.report import psnr
from mirage.core.synthetic import SyntheticVideo
from mirage.model.dit import WanDiT
from mirage.model.dit_backend import DiTTorchBackend
from mirage.model.dit_backend import block_codec as backend_codec
from mirage.model.dit_cache import BlockStepper
from mirage.model.dit_graphs import DiTGraph
from mirage.model.latent import BlockCodec
from mirage.model.taehv import Taehv, TaehvBlockCodec, TaehvDecoder
from mirage.model.torch_device import TorchCpu
from mirage.runtime.execution import NonFiniteError
from mirage.runtime.pipeline import Pipeline

from .bf16 import Bf16Io
from .onnx_export import DTYPES, ExportError, ExportOptions, activation_range, export_module, graph_module
from .quantize import quantize_qdq

Calls = dict[str, list[dict[str, np.ndarray]]]
Run = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]  # one graph on numpy feeds, in its spec's order
DIT_DTYPES = {**DTYPES, "bf16": torch.bfloat16}  # the precisions a DiT graph is traced in (fp8 quantizes fp32)
CODEC_CALLS = 2  # recorded blocks of the autoencoder's graphs: a frame codec has no memory, and is most of the time


def _decomposed_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q kᵀ / √d + mask) v in MatMul/Softmax (the masks here are bool: True = may attend)."""
    scores = (q * (scale or q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


@contextlib.contextmanager
def decomposed_attention(enabled: bool):
    """While tracing, every F.scaled_dot_product_attention (WanDiT's cross-attention calls it directly)
    becomes MatMul/Softmax; the model code stays the one the cached rollout runs."""
    if not enabled:
        yield
        return
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _decomposed_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def block_codec(cfg, taehv: TaehvDecoder | None = None) -> BlockCodec | TaehvBlockCodec | None:
    """model.dit_backend.block_codec, with the TAEHV file that an export of a codec "taehv" config needs."""
    if cfg.codec == "taehv" and taehv is None:
        raise ExportError(f"{cfg.name} with codec 'taehv': give the TAEHV file (--decoder)")
    return backend_codec(cfg, taehv)


def dit_specs(cfg, batch: int = 1, precision: str = "fp32", taehv: TaehvDecoder | None = None) -> dict:
    """The graphs a DiT artifact holds: the config's, less TAEHV's `encode` when `taehv` is a decoder only (the
    manifest says so: engine.verify.artifact_specs drops it the same way)."""
    specs = G.model_graphs(cfg, batch, precision=precision)
    if cfg.codec == "taehv" and not isinstance(taehv, Taehv):
        del specs[G.ENCODE]
    return specs


def _module(model: WanDiT, graph: str, codec: BlockCodec | None) -> torch.nn.Module:
    """The module one DiT graph traces: the block graphs' DiTGraph, the autoencoder's the U-Net's codec module."""
    return graph_module(model, graph, codec) if graph in (G.ENCODE, G.DECODE) else DiTGraph(model, graph).eval()


def torch_run(model: WanDiT, specs: dict[str, G.GraphSpec], taehv: TaehvDecoder | None = None) -> Run:
    """One graph's numpy feeds through the PyTorch graph modules (CPU, the model's dtype), the codec's too where
    the config has one: the reference of per-tensor parity."""
    codec = block_codec(model.cfg, taehv) if G.DECODE in specs else None
    modules = {g: _module(model, g, codec) for g in specs}
    dtype = model.patch_embedding.weight.dtype

    @torch.no_grad()
    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.array(v)) for v in feeds.values()]
        args = [a.to(dtype) if a.is_floating_point() and spec.dtype != "float32" else a
                for a, spec in zip(args, specs[graph].inputs)]
        outs = modules[graph](*args)
        outs = (outs,) if torch.is_tensor(outs) else outs
        return {x.name: o.float().numpy() for x, o in zip(specs[graph].outputs, outs)}

    return run


def ort_run(files: dict[str, Path]) -> tuple[Run, OrtBackend]:
    """One graph's numpy feeds through ONNX Runtime sessions (CPU EP); close the backend when done."""
    ort = OrtBackend(files)

    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = ort.sessions[graph]
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    return run, ort


def rollout_prompt(cfg, seed: int = 0) -> np.ndarray:
    """Random prompt embeddings (text_len, text_dim) of a rollout (its noise is the runtime's, from the seed)."""
    return torch.randn(cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed)).numpy()


def cpu_pipeline(backend, cfg, specs: dict[str, G.GraphSpec], text: np.ndarray, seed: int,
                 plumbing=None, strength: float | None = None) -> Pipeline:
    """The runtime's pipeline of a DiT on the CPU (CpuExecution driving BlockUnit) over `backend` and its
    `plumbing` (None: numpy), every row prompted with `text`, row b's noise seeded seed + b, video-to-video at
    `strength` (None: generation); close it when done."""
    options = PipelineOptions(batch=specs[G.DIT_STEP].tensor(G.X_T).shape[0], strength=strength)
    pipe = Pipeline(backend, cfg, specs, options, plumbing)
    pipe.set_prompt(text)
    pipe.reset(seed)
    return pipe


def runtime_blocks(pipe: Pipeline, blocks: int, inputs: np.ndarray | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """`blocks` blocks of the runtime, each computed when submitted (CpuExecution), given inputs[k] (video-to-video:
    (B, F, H, W, 3) frames in [-1, 1]): its clean latents (B, in_dim, N, h, w), its frames (B·F, 3, H, W), the noise
    it drew (steps, B, in_dim, N, h, w), all float32, and whether they were finite (a non-finite block is reported,
    not raised: the parity says so)."""
    buf, to_host = pipe.buf, pipe.execution.cpu.to_host
    for k in range(blocks):
        try:
            pipe.step_batch(None if inputs is None else inputs[k])
            finite = True
        except NonFiniteError:
            pipe.execution.collect()
            finite = False
        host = [to_host(a).astype(np.float32) for a in (buf.x0, buf.frame, *buf.noise)]
        yield host[0], host[1], np.stack(host[2:]), finite


class _Recorder(DiTTorchBackend):
    """The PyTorch backend (CPU, float32) keeping each graph's feeds, copied, in its spec's order."""

    def __init__(self, model: WanDiT, specs: dict[str, G.GraphSpec], calls: Calls, codec=None):
        super().__init__(model, specs, "cpu", codec=codec)
        self.calls = calls

    def run(self, graph, inputs, output):
        self.calls[graph].append({x.name: inputs[x.name].numpy().copy() for x in self.specs[graph].inputs})
        super().run(graph, inputs, output)


def _synthetic_blocks(cfg, blocks: int, frames: int, batch: int, seed: int) -> np.ndarray:
    """`blocks` blocks of `frames` frames of a synthetic clip, (blocks, batch, frames, H, W, 3) in [-1, 1], every
    row the same."""
    video = SyntheticVideo(max(cfg.height, cfg.width), seed=seed).clip(0, blocks * frames)[:, :cfg.height, :cfg.width]
    clip = (video * 2 - 1).reshape(blocks, 1, frames, *video.shape[1:])
    return np.ascontiguousarray(np.broadcast_to(clip, (blocks, batch, *clip.shape[2:])))


def record_dit_calls(model: WanDiT, blocks: int = 4, seed: int = 1, batch: int = 1,
                     taehv: TaehvDecoder | None = None) -> Calls:
    """Feeds each graph gets during a real fp32 rollout of the runtime of `blocks` blocks (the cache filling
    and, with enough blocks, rolling): for tensor parity and tracing. With `taehv`, TAEHV's graphs are in the
    rollout (video-to-video on a synthetic clip where it encodes)."""
    model, cfg = model.float().eval(), model.cfg
    specs = dit_specs(cfg, batch, taehv=taehv)
    calls: Calls = {g: [] for g in specs}
    # TAEHV's graphs run in the rollout (their state is real only there); a per-frame codec's calls follow it
    temporal = taehv is not None
    rollout = specs if temporal else {g: specs[g] for g in G.DIT_GRAPHS}
    strength = 0.5 if temporal and G.ENCODE in specs else None
    with cpu_pipeline(_Recorder(model, rollout, calls, block_codec(cfg, taehv) if temporal else None), cfg, rollout,
                      rollout_prompt(cfg, seed), seed, TorchCpu(), strength) as pipe:
        inputs = _synthetic_blocks(cfg, blocks, pipe.frames_in, batch, seed) if strength else None
        for _ in runtime_blocks(pipe, blocks, inputs):
            pass
    if not temporal and G.ENCODE in specs:  # the autoencoder's: a synthetic clip's blocks encoded, latents decoded
        image = specs[G.ENCODE].tensor(G.IMAGE).shape
        codec_blocks = min(blocks, CODEC_CALLS)
        video = SyntheticVideo(max(cfg.height, cfg.width), seed=seed).clip(0, codec_blocks * image[0])
        run = torch_run(model, {g: specs[g] for g in (G.ENCODE, G.DECODE)})
        for frames in video[:, :cfg.height, :cfg.width].transpose(0, 3, 1, 2).reshape(codec_blocks, *image):
            calls[G.ENCODE].append({G.IMAGE: frames})
            calls[G.DECODE].append({G.Z: run(G.ENCODE, {G.IMAGE: frames})[G.Z]})
    return calls


def graph_precision(graph: str, precision: str) -> str:
    """The precision one graph of a DiT artifact of `precision` is traced in: a bf16 artifact's autoencoder
    graphs stay fp32, as an 8-bit artifact's (quantized from fp32) and the U-Net's do."""
    if precision not in DIT_DTYPES or (precision == "bf16" and graph in (G.ENCODE, G.DECODE)):
        return "fp32"
    return precision


def export_dit_graph(model: WanDiT, graph: str, path: str | Path, options: ExportOptions,
                     example: dict[str, np.ndarray], taehv: TaehvDecoder | None = None) -> Path:
    """Export one DiT graph, traced on `example` (recorded feeds at fp32: they are cast to the graph's dtypes);
    `encode` / `decode` with the config's per-frame autoencoder, or `taehv`."""
    if options.precision not in DIT_DTYPES:
        raise ExportError(f"precision {options.precision!r}: the DiT exports {', '.join(DIT_DTYPES)}")
    if options.max_batch is not None and options.max_batch > 1:
        raise ExportError("the DiT's graphs export at a static batch for now (--max-batch is the U-Net's)")
    codec_graph, precision = graph in (G.ENCODE, G.DECODE), graph_precision(graph, options.precision)
    dtype = DIT_DTYPES[precision]
    specs = G.model_graphs(model.cfg, options.batch, options.max_batch, options.precision)
    net = (model if model.patch_embedding.weight.dtype == dtype else copy.deepcopy(model)).to("cpu", dtype).eval()
    inputs = {x.name: torch.from_numpy(_at_spec(example[x.name], x)) for x in specs[graph].inputs}
    codec = block_codec(model.cfg, taehv) if codec_graph else None
    module = _module(net, graph, None if codec is None else copy.deepcopy(codec).to("cpu", dtype))
    if precision == "bf16":  # float32 I/O around it (see export/bf16.py)
        module = Bf16Io(module, G.model_graphs(model.cfg, options.batch, precision="fp16")[graph])
    decompose = options.precision == "fp32" if options.decompose_attention is None else options.decompose_attention
    with decomposed_attention(decompose):
        return export_module(module, graph, inputs, [x.name for x in specs[graph].outputs], path, options.opset)


def _at_spec(value: np.ndarray, x: G.TensorSpec) -> np.ndarray:
    """`value` as the spec's tensor: as it is when it already has the spec's shape and dtype (no copy of a
    multi-GB cache), else its first row broadcast to the spec's batch and cast."""
    if value.shape == x.shape and value.dtype == x.dtype and value.flags.writeable:
        return value
    return np.array(np.broadcast_to(value[:1], x.shape), x.dtype)


def trace_feeds(cfg, precision: str, batch: int = 1,
                taehv: TaehvDecoder | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Feeds to trace each DiT graph on without recording a rollout (wan-1.3b's would take hours on a CPU):
    a first block's static inputs, and the others at their spec's shape and dtype, uninitialized (tracing
    reads shapes, never values; the pages of np.empty's multi-GB caches are never touched). Per graph: TAEHV's
    two graphs both have state named mem_0, ... at other shapes."""
    static = dict(block_inputs(cfg, np.zeros(batch, np.int64)))  # every row at the video's first frame
    return {graph: {x.name: static[x.name] if x.name in static else np.empty(x.shape, x.dtype) for x in spec.inputs}
            for graph, spec in dit_specs(cfg, batch, precision, taehv).items()}

def export_dit_onnx(model: WanDiT, out: str | Path, precision: str = "fp16",
                    progress: Callable[[str], None] = lambda s: None, taehv: TaehvDecoder | None = None) -> dict:
    """Every DiT graph of `model` as ONNX in `out` (weights over 1 GiB in a side file), TAEHV's with `taehv` (the
    config's codec "taehv"), no parity: what a large model's export costs, per graph: seconds, bytes written (the
    .onnx and its external data), and the process's peak resident memory so far."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feeds, report = trace_feeds(model.cfg, precision, taehv=taehv), {}
    for graph in feeds:
        progress(f"export {graph} ({precision})")
        start = time.perf_counter()
        path = export_dit_graph(model, graph, out / G.onnx_file(graph), ExportOptions(precision), feeds[graph], taehv)
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.name.startswith(path.name)}
        report[graph] = {"seconds": time.perf_counter() - start, "files": files, "bytes": sum(files.values()),
                         "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return report


def export_dit_qdq(model: WanDiT, graph: str, path: str | Path, batch: int, calibration: list[dict[str, np.ndarray]],
                   mode: str = "fp8") -> Path:
    """Export one DiT graph as an 8-bit Q/DQ graph: fp32 with `Attention` kept, then ModelOpt calibrated on
    `calibration` (the graph's feeds from a recorded rollout)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_dit_graph(model, graph, Path(tmp) / G.onnx_file(graph),
                                ExportOptions("fp32", batch, decompose_attention=False), calibration[0])
        return quantize_qdq(fp32, path, [{k: torch.from_numpy(v) for k, v in c.items()} for c in calibration], mode)


def dit_tensor_parity(model: WanDiT, files: dict[str, Path], calls: Calls, precision: str,
                      taehv: TaehvDecoder | None = None) -> dict:
    """Worst relative and absolute error of every graph output (ONNX Runtime vs PyTorch fp32) over `calls`."""
    model = model.float().eval()
    specs = G.model_graphs(model.cfg, precision=precision)
    ref_run, (out_run, ort) = torch_run(model, {g: s for g, s in G.model_graphs(model.cfg).items() if g in calls},
                                        taehv), ort_run(files)
    report = {}
    try:
        for graph, feeds_list in calls.items():
            for feeds in feeds_list:
                ref = ref_run(graph, feeds)
                out = out_run(graph, {x.name: np.ascontiguousarray(feeds[x.name], x.dtype)
                                      for x in specs[graph].inputs})
                for name, r in ref.items():
                    o = out[name].astype(np.float32)
                    key = f"{graph}.{name}"
                    worst = report.setdefault(key, {"rel": 0.0, "max_abs": 0.0, "calls": 0})
                    rel = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12)) if np.isfinite(o).all() \
                        else float("inf")
                    worst.update(rel=max(worst["rel"], rel), max_abs=max(worst["max_abs"], float(np.abs(o - r).max())),
                                 calls=worst["calls"] + 1)
    finally:
        ort.close()
    return report


def dit_activation_range(model: WanDiT, calls: Calls, taehv: TaehvDecoder | None = None) -> float:
    """Largest |activation| of any module over the recorded rollout (fp32): fp16's margin as a number."""
    tensors = {g: [{k: torch.from_numpy(v) for k, v in feeds.items()} for feeds in c] for g, c in calls.items()}
    return activation_range(model.float().eval(), tensors, block_codec(model.cfg, taehv), module_for=_module)


@torch.no_grad()
def dit_rollout_psnr(model: WanDiT, files: dict[str, Path], precision: str, frames: int = 50, seed: int = 0,
                     batch: int = 1, taehv: TaehvDecoder | None = None) -> dict:
    """PSNR of a `frames`-latent-frame rollout of the runtime on ONNX Runtime (its block loop over the exported
    graphs) against BlockStepper in PyTorch fp32, given the noise the runtime drew and the same prompt (row 0
    of a `batch`); with a `decode` graph, also of the video frames each rollout decodes to (`video_psnr_*`;
    TAEHV's streamed, the reference's blocks through PyTorch's TaehvBlockCodec in order)."""
    model, cfg = model.float().eval(), model.cfg
    blocks = -(-frames // cfg.block_frames)
    text = rollout_prompt(cfg, seed)
    stepper = BlockStepper(model, batch)
    stepper.set_prompt(torch.from_numpy(np.repeat(text[None], batch, 0)))
    out, video, ref_blocks, finite = [], [], [], True
    specs = {g: s for g, s in G.model_graphs(cfg, batch, precision=precision).items() if g in files}
    with cpu_pipeline(OrtBackend(files), cfg, specs, text, seed) as pipe:
        for x0, image, noise, ok in runtime_blocks(pipe, blocks):
            ref_blocks.append(stepper.step(torch.from_numpy(noise)))
            out.append(x0[0].swapaxes(0, 1))
            video.append(image[:pipe.unit.frames])  # row 0's frames
            finite &= ok
    ref = np.concatenate([b[0].transpose(0, 1).numpy() for b in ref_blocks])
    out = np.concatenate(out)
    frame_psnr = latent_psnr(out, ref)
    report = {"frames": int(ref.shape[0]), "unit": "latent frames", "blocks": blocks, "steps": cfg.steps,
              "precision": precision,
              "psnr_mean_db": float(frame_psnr.mean()), "psnr_min_db": float(frame_psnr.min()),
              "psnr_last10_db": float(frame_psnr[-10:].mean()), "finite": finite and bool(np.isfinite(out).all())}
    if G.DECODE in files:
        ref_video = _reference_video(block_codec(cfg, taehv), [b[:1] for b in ref_blocks], cfg)
        video_psnr = psnr(np.concatenate(video), ref_video)
        report.update(video_psnr_mean_db=float(video_psnr.mean()), video_psnr_min_db=float(video_psnr.min()))
    return report


def _reference_video(codec: BlockCodec | TaehvBlockCodec, blocks: list[torch.Tensor], cfg) -> np.ndarray:
    """The frames PyTorch decodes a row's blocks of latents (1, C, N, h, w) to, in order, as the runtime's `decode`
    lays them out: a per-frame codec's each alone; TAEHV's streamed, its memory carried from block to block (the
    first block fresh)."""
    if isinstance(codec, BlockCodec):
        return np.concatenate([codec.decode(b).numpy() for b in blocks])
    spec = G.model_graphs(cfg, 1)[G.DECODE]
    frames, memory = [], [torch.zeros(spec.tensor(name).shape) for name in G.state_inputs(spec)]
    for k, b in enumerate(blocks):
        image, *memory = codec.decode(b, torch.tensor([float(k == 0)]), *memory)
        frames.append(image.numpy())
    return np.concatenate(frames)
