"""Benchmark of the DiT's chunk-causal generation (scripts/bench_dit.py is the driver).

Random weights in the published layout, one prompt of random text embeddings, batch 1, a clip of
`blocks` blocks from an empty cache, timed per block for each path:

    eager          the block step as PyTorch ops
    compile        each layer through torch.compile (Inductor; one compilation serves all layers)
    graph          the eager block step captured as CUDA graphs (one per span)
    compile-graph  Inductor's kernels captured as CUDA graphs

With `fp8` ("static", "dynamic"), every path also runs on an FP8 copy of the model (mirage.model.fp8: E4M3
matmuls in the blocks' attention and FFN, weights per channel, activations per tensor calibrated on a clip
with the benchmark's prompt, or per token at run time); its rows carry the recipe.

Each path first runs the clip's first blocks untimed, until every span (cache fill level) has run
(compilation, graph capture: what a server does before its first frame), then the timed clip. A block's time is wall-clock from its noise to its clean
latents on the host's clock after a device synchronize (so host overhead counts), no decoder.
Video frames follow the Wan VAE: 4 per latent frame, the video's first latent frame 1 (a first block of 3
latent frames is 9 video frames, later blocks 12; 7 blocks are Self-Forcing's 81-frame clip).

The bf16 floor of a block is its FLOPs (`DiTConfig.block_flops`: matmuls and attention QKᵀ/PV over every
key read, 2 FLOPs per multiply-add) at the matmul rate measured here (an 8192³ bf16 matmul).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import statistics
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mirage.core.config import ConfigError, DiTConfig
from mirage.core.errors import BackendError
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper, CapturedBlockStep
from mirage.model.fp8 import ACTIVATIONS as FP8, fp8_copy

MODES = ("eager", "compile", "graph", "compile-graph")
# SDPA backends the attention may be pinned to ("auto": PyTorch's own choice); flash-attn itself is absent
ATTENTION = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> float | None:
    """bf16 FLOP/s of an 8192³ matmul on this CUDA device (None on the CPU)."""
    if device.type != "cuda":
        return None
    from mirage.plugins_cpp.bench import device_ms

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * 8192 ** 3 / (device_ms(lambda: a @ b, calls=10) * 1e-3)


def run_clip(step, stepper: BlockStepper, blocks: int, seed: int, device) -> tuple[list[float], torch.Tensor]:
    """Block times (s) of one clip from an empty cache, and the last block's latents. Each block draws
    its noise (the start and the re-noisings) inside its time from a generator seeded per clip, so
    every path sees the same noise."""
    cfg = stepper.cfg
    stepper.reset()
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.steps, stepper.cache.k.shape[1], cfg.in_dim, cfg.block_frames, *cfg.latent_size)
    times, x0 = [], None
    for _ in range(blocks):
        sync(device)
        start = time.perf_counter()
        x0 = step(torch.randn(shape, device=device, generator=gen))
        sync(device)
        times.append(time.perf_counter() - start)
    return times, x0.float().clone()


def tensor_bytes(model: WanDiT) -> int:
    """What a model keeps on its device: parameters and buffers (an FP8 model's weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def bench_mode(model: WanDiT, mode: str, text: torch.Tensor, blocks: int, seed: int, dtype,
               device, resident: int) -> tuple[dict, torch.Tensor]:
    """One path's timed clip, and its last block's latents (for the agreement check); `resident`: the
    bytes of the models meant to stay on the device (the one timed and any FP8 copy)."""
    cfg = model.cfg
    # Earlier paths' caches, graphs and compilations go first; what survives anyway is reported and
    # taken out of this path's peak (the model's weights are the only intended resident)
    gc.collect()
    torch._dynamo.reset()
    stale = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        stale = torch.cuda.memory_allocated(device) - resident
    stepper = BlockStepper(model, batch=1, device=device, dtype=dtype)
    if mode.startswith("compile"):
        stepper.compile()
    step = stepper.step
    setup_start = time.perf_counter()
    if mode.endswith("graph"):
        graphs = CapturedBlockStep(stepper)
        step = graphs.step
    stepper.set_prompt(text)
    warm = min(blocks, cfg.window_frames // cfg.block_frames + 2)  # enough blocks to reach every span
    run_clip(step, stepper, warm, seed, device)  # warm-up: compiles, captures every span
    sync(device)
    setup_s = time.perf_counter() - setup_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    stepper.set_prompt(text)
    sync(device)
    prompt_s = time.perf_counter() - start
    times, latents = run_clip(step, stepper, blocks, seed, device)
    ms = [t * 1e3 for t in times]
    video = [cfg.video_frames(cfg.block_frames, first=b == 0) for b in range(len(ms))]
    result = {
        "mode": mode, "setup_s": setup_s, "prompt_ms": prompt_s * 1e3, "first_block_ms": ms[0],
        "block_median_ms": statistics.median(ms), "block_p99_ms": float(np.percentile(ms, 99)),
        "block_mean_ms": statistics.fmean(ms), "video_frames": sum(video),
        "video_fps": sum(video) / (sum(ms) / 1e3), "blocks_ms": ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - stale if device.type == "cuda" else None,
        "stale_bytes_of_earlier_paths": stale,
    }
    if len(ms) >= 500:  # the long-generation target: late blocks against early ones at a full window
        result["p99_blocks_25_50_ms"] = float(np.percentile(ms[25:50], 99))
        result["p99_blocks_450_500_ms"] = float(np.percentile(ms[450:500], 99))
    return result, latents


def floor(cfg: DiTConfig, blocks: int, peak: float | None) -> dict:
    flops = [cfg.block_flops(cfg.past_frames(b)) for b in range(blocks)]
    attention = [(cfg.steps + 1) * cfg.attention_flops(cfg.block_frames, cfg.past_frames(b)) for b in range(blocks)]
    out = {"block_flops": flops, "mean_block_tflop": sum(flops) / len(flops) / 1e12,
           "attention_share_of_flops": sum(attention) / sum(flops), "matmul_flops_per_s": peak,
           "weight_bytes_bf16": cfg.weight_bytes(2), "params": cfg.param_count()}
    if peak:
        out["floor_ms"] = [f / peak * 1e3 for f in flops]
        out["mean_floor_ms"] = sum(out["floor_ms"]) / blocks
    return out


def run(cfg: DiTConfig, modes: list[str], blocks: int, device: str = "cuda", seed: int = 0,
        attention: str = "auto", fp8: tuple[str, ...] = ()) -> dict:
    """The benchmark: every path over the same clip (same weights, prompt and noise), with every SDPA
    call on the `attention` backend; then every path again on an FP8 copy per `fp8` activation mode."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"modes {unknown or modes}: choose from {', '.join(MODES)}")
    if any(a not in FP8 for a in fp8):
        raise ConfigError(f"fp8 {','.join(fp8)}: choose from {', '.join(FP8)}")
    if attention not in ATTENTION:
        raise ConfigError(f"attention {attention!r}: choose from {', '.join(ATTENTION)}")
    dev = torch.device(device)
    if dev.type != "cuda" and any(m.endswith("graph") for m in modes):
        raise BackendError(f"CUDA graphs need a CUDA device, not {device}: on the CPU choose eager or compile")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(dev):
        model = WanDiT(cfg).to(dtype).eval()
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=gen)
    models, recipes = {None: model}, {}
    for activations in fp8:
        models[activations], recipes[activations] = fp8_copy(model, activations, calibration_text=text)
    resident = sum(tensor_bytes(m) for m in models.values())
    peak = matmul_peak(dev)
    report = {"config": cfg.name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": 1, "blocks": blocks,
              "resolution": f"{cfg.width}x{cfg.height}", "steps": cfg.steps, "block_frames": cfg.block_frames,
              "window_frames": cfg.window_frames, "sink_frames": cfg.sink_frames, "attention": attention,
              "floor": floor(cfg, blocks, peak), "fp8": recipes, "modes": []}
    reference = None
    for (activations, bench_model), mode in itertools.product(models.items(), modes):
        backend = ATTENTION[attention]
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            result, latents = bench_mode(bench_model, mode, text, blocks, seed + 2, dtype, dev, resident)
        result["fp8"] = activations
        reference = latents if reference is None else reference
        result["max_abs_diff_vs_first_mode"] = float((latents - reference).abs().max())
        if peak:
            result["floor_share"] = report["floor"]["mean_floor_ms"] / result["block_mean_ms"]
        report["modes"].append(result)
    return report


def table(report: dict) -> str:
    """One line per path: the numbers the issue's targets are stated in."""
    head = (f"{report['config']} on {report['device']} ({report['dtype']}, {report['resolution']}, batch 1, "
            f"{report['steps']} steps, blocks of {report['block_frames']}, {report['blocks']} blocks, "
            f"window {report['window_frames']} / sink {report['sink_frames']}, SDPA {report['attention']}; "
            f"{report['floor']['mean_block_tflop']:.2f} TFLOP per block on average)")
    rows = [head, f"{'mode':<20}{'first ms':>10}{'median ms':>11}{'p99 ms':>9}{'mean ms':>9}{'video fps':>11}"
                  f"{'peak GB':>9}{'floor':>7}{'diff':>10}"]
    for m in report["modes"]:
        mem = f"{m['peak_memory_bytes'] / 1e9:.2f}" if m["peak_memory_bytes"] is not None else "-"
        share = f"{m['floor_share']:.0%}" if "floor_share" in m else "-"
        label = m["mode"] + (f" fp8-{m['fp8']}" if m.get("fp8") else "")
        rows.append(f"{label:<20}{m['first_block_ms']:>10.1f}{m['block_median_ms']:>11.1f}{m['block_p99_ms']:>9.1f}"
                    f"{m['block_mean_ms']:>9.1f}{m['video_fps']:>11.2f}{mem:>9}{share:>7}"
                    f"{m['max_abs_diff_vs_first_mode']:>10.2e}")
    if report["floor"].get("mean_floor_ms"):
        rows.append(f"bf16 floor {report['floor']['mean_floor_ms']:.1f} ms per block at the measured "
                    f"{report['floor']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    return "\n".join(rows)
