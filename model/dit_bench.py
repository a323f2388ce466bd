"""Benchmark of the DiT's chunk-causal generation (scripts/bench_dit.py is the driver).

Random weights in the published layout, one prompt of random text embeddings, batch 1, a clip of
`blocks` blocks from an empty cache, timed per block for each path:

    eager          the block step as PyTorch ops
    compile        each layer through torch.compile (Inductor; one compilation serves all layers)
    graph          the eager block step captured as CUDA graphs (one per span)
    compile-graph  Inductor's kernels captured as CUDA graphs

Each path first runs the clip's first blocks untimed, until every span (cache fill level) has run
(compilation, graph capture: what a server does before its first frame), then the timed clip. A block's time is wall-clock from its noise to its clean
latents on the host's clock after a device synchronize (so host overhead counts), no decoder.
Video frames follow the Wan VAE: 4 per latent frame, the video's first latent frame 1 (a first block of 3
latent frames is 9 video frames, later blocks 12; 7 blocks are Self-Forcing's 81-frame clip).

With decoders (`decoders`: "taehv", the tiny decoder real-time demos use, and "wan-vae", diffusers'
AutoencoderKLWan in the Wan 2.1 layout; random weights), the timed clip is run again with every block
decoded to video frames, twice: serial (a block is generated, then decoded, before the next starts; the
decode is also timed alone) and overlapped (CUDA: block b is decoded on a second stream while block b+1
is generated). A block's frames are ready when its decode ends; the clip's time to first frame, the
intervals between ready blocks and the video frames per second are counted from those times (serial:
the host's clock after a synchronize; overlapped: CUDA events on the device's timeline, the host's
launch delays included since the device waits for them). Frames stay on the device (no host copy).

Blocks are reported whole and split: the blocks at a full window (the cache holds window_frames -
block_frames past frames: the long run's steady state) apart from the filling ones before them.
With `profile`, one more block of each path is run under torch.profiler (graph paths through their
ungraphed step: the same kernels, which the profiler sees one by one) and its kernels are summed by kind
(mirage.core.kernel_profile, as the U-Net's frame profile).

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

from mirage.core import kernel_profile
from mirage.core.config import ConfigError, DiTConfig
from mirage.core.errors import BackendError
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper, CapturedBlockStep
from mirage.model.fp8 import ACTIVATIONS as FP8, fp8_copy
from mirage.model.taehv import TaehvDecoder
from mirage.model.wan_decode import random_wan_vae

MODES = ("eager", "compile", "graph", "compile-graph")
# SDPA backends the attention may be pinned to ("auto": PyTorch's own choice); flash-attn itself is absent
ATTENTION = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
DECODERS = ("taehv", "wan-vae")


def random_decoder(name: str, device: torch.device, dtype):
    """A streaming latent decoder (`reset()`, `decode(latents)`) with random weights in its published layout."""
    decoder = TaehvDecoder().eval().requires_grad_(False) if name == "taehv" else random_wan_vae()
    return decoder.to(device, dtype)


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


def noise_shape(stepper: BlockStepper) -> tuple[int, ...]:
    """One block's noise: the start and each re-noising (steps, B, in_dim, N, h, w)."""
    cfg = stepper.cfg
    return cfg.steps, stepper.cache.k.shape[1], cfg.in_dim, cfg.block_frames, *cfg.latent_size


def run_clip(step, stepper: BlockStepper, blocks: int, seed: int, device) -> tuple[list[float], torch.Tensor]:
    """Block times (s) of one clip from an empty cache, and the last block's latents. Each block draws
    its noise (the start and the re-noisings) inside its time from a generator seeded per clip, so
    every path sees the same noise."""
    stepper.reset()
    gen = torch.Generator(device=device).manual_seed(seed)
    times, x0 = [], None
    for _ in range(blocks):
        sync(device)
        start = time.perf_counter()
        x0 = step(torch.randn(noise_shape(stepper), device=device, generator=gen))
        sync(device)
        times.append(time.perf_counter() - start)
    return times, x0.float().clone()


def run_decoded_clip(step, stepper: BlockStepper, decoder, blocks: int, seed: int, device,
                     side: torch.cuda.Stream | None) -> tuple[list[float], list[float], int]:
    """One clip from an empty cache with every block decoded: the times (ms from the clip's start) at
    which each block's frames are ready, the decode times alone (serial only, else empty) and the
    video frames decoded. Serial without a `side` stream, else each block is decoded on `side` while the
    next is generated. The noise is run_clip's (same seed, same draws)."""
    stepper.reset()
    decoder.reset()
    gen = torch.Generator(device=device).manual_seed(seed)
    ready, decode, frames = [], [], 0
    if side is None:
        sync(device)
        start = time.perf_counter()
        for _ in range(blocks):
            x0 = step(torch.randn(noise_shape(stepper), device=device, generator=gen))
            sync(device)
            decode_start = time.perf_counter()
            frames += decoder.decode(x0).shape[1]
            sync(device)
            ready.append((time.perf_counter() - start) * 1e3)
            decode.append((time.perf_counter() - decode_start) * 1e3)
        return ready, decode, frames
    main = torch.cuda.current_stream(device)
    start, done = torch.cuda.Event(enable_timing=True), []
    sync(device)
    start.record(main)
    for _ in range(blocks):
        # a graph's output is static (the next replay overwrites it): the decoder reads a copy
        x0 = step(torch.randn(noise_shape(stepper), device=device, generator=gen)).clone()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            frames += decoder.decode(x0).shape[1]
            done.append(torch.cuda.Event(enable_timing=True))
            done[-1].record(side)
        x0.record_stream(side)  # made on the main stream, still read on the side one when Python drops it
    sync(device)
    return [start.elapsed_time(e) for e in done], decode, frames


def block_stats(ms: list[float]) -> dict:
    return {"first_block_ms": ms[0], "block_median_ms": statistics.median(ms),
            "block_p99_ms": float(np.percentile(ms, 99)), "block_mean_ms": statistics.fmean(ms)}


def window_split(cfg: DiTConfig, ms: list[float]) -> dict:
    """The blocks at a full window (the steady state of a long run) apart from the filling ones."""
    full = [t for b, t in enumerate(ms) if cfg.past_frames(b) == cfg.cache_frames]
    filling = ms[:len(ms) - len(full)]
    out = {"full_window_blocks": len(full), "filling_blocks": len(filling),
           "filling_block_mean_ms": statistics.fmean(filling) if filling else None}
    if full:
        out.update(full_window_median_ms=statistics.median(full), full_window_p99_ms=float(np.percentile(full, 99)),
                   full_window_mean_ms=statistics.fmean(full))
    return out


def decoded(step, stepper: BlockStepper, decoders: dict, blocks: int, seed: int, device, fps: float,
            stale: int) -> list[dict]:
    """The clip again with each decoder, serial and (CUDA) overlapped: time to first frame, intervals
    between ready blocks, video frames per second with decode and its ratio to `fps` (without); peak
    memory less `stale` (what earlier paths left), as the path's own."""
    rows = []
    sides = [None] + ([torch.cuda.Stream(device)] if device.type == "cuda" else [])
    for name, decoder in decoders.items():
        for side in sides:
            with torch.no_grad():  # warm-up: cuDNN's choices, the Wan VAE's first-chunk and later paths, the stream
                run_decoded_clip(step, stepper, decoder, 2, seed, device, side)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                ready, decode, frames = run_decoded_clip(step, stepper, decoder, blocks, seed, device, side)
            intervals = [b - a for a, b in zip([0.0] + ready, ready)]
            row = {"decoder": name, "overlap": side is not None, "first_frame_ms": ready[0], **block_stats(intervals),
                   "video_frames": frames, "video_fps": frames / (ready[-1] / 1e3),
                   "decode_median_ms": statistics.median(decode) if decode else None,
                   "decode_p99_ms": float(np.percentile(decode, 99)) if decode else None,
                   "ready_ms": ready, "decode_ms": decode,
                   "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - stale if device.type == "cuda"
                   else None}
            row["fps_vs_no_decoder"] = row["video_fps"] / fps
            rows.append(row)
    return rows


def profile_block(step, stepper: BlockStepper, seed: int, device) -> dict:
    """One block of `step` (after one unprofiled, for a span not yet compiled) by kernel kind. On the CPU
    the profiler sees operators, not kernels: their self times (a smoke run of the same table)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator(device=device).manual_seed(seed)
    cuda = device.type == "cuda"
    with torch.no_grad():
        step(torch.randn(noise_shape(stepper), device=device, generator=gen))
        noise = torch.randn(noise_shape(stepper), device=device, generator=gen)
        span = stepper.cache.span
        sync(device)
        with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            step(noise)
            sync(device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [(e.name, e.device_time if cuda else e.self_cpu_time_total) for e in prof.events()
               if e.device_type == kind]
    return {"span_frames": span, **kernel_profile.summarize(kernels, "block")}


def tensor_bytes(module: torch.nn.Module) -> int:
    """What a module keeps on its device: parameters and buffers (an FP8 model's weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def bench_mode(model: WanDiT, mode: str, text: torch.Tensor, blocks: int, seed: int, dtype,
               device, resident: int, decoders: dict, profile: bool) -> tuple[dict, torch.Tensor]:
    """One path's timed clip (then with each decoder, then profiled), and its last block's latents
    without decoder (for the agreement check); `resident`: the bytes meant to stay on the device (the
    models timed, any FP8 copy, the decoders)."""
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
        "mode": mode, "setup_s": setup_s, "prompt_ms": prompt_s * 1e3, **block_stats(ms), **window_split(cfg, ms),
        "video_frames": sum(video), "video_fps": sum(video) / (sum(ms) / 1e3), "blocks_ms": ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - stale if device.type == "cuda" else None,
        "stale_bytes_of_earlier_paths": stale,
    }
    if len(ms) >= 500:  # the long-generation target: late blocks against early ones at a full window
        result["p99_blocks_25_50_ms"] = float(np.percentile(ms[25:50], 99))
        result["p99_blocks_450_500_ms"] = float(np.percentile(ms[450:500], 99))
    result["decoded"] = decoded(step, stepper, decoders, blocks, seed, device, result["video_fps"], stale)
    if profile:
        result["profile"] = profile_block(stepper.step, stepper, seed, device)
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
        attention: str = "auto", decoders: tuple[str, ...] = (), profile: bool = False,
        fp8: tuple[str, ...] = ()) -> dict:
    """The benchmark: every path over the same clip (same weights, prompt and noise), with every SDPA
    call on the `attention` backend; each path also with each of `decoders`, and profiled; then every
    path again on an FP8 copy per `fp8` activation mode."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"modes {unknown or modes}: choose from {', '.join(MODES)}")
    if any(a not in FP8 for a in fp8):
        raise ConfigError(f"fp8 {','.join(fp8)}: choose from {', '.join(FP8)}")
    if attention not in ATTENTION:
        raise ConfigError(f"attention {attention!r}: choose from {', '.join(ATTENTION)}")
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown:
        raise ConfigError(f"decoders {unknown}: choose from {', '.join(DECODERS)}")
    if "wan-vae" in decoders and attention != "auto":  # the pin holds for the decoders too
        raise ConfigError(f"the Wan VAE with attention {attention!r}: its attention has one 384-wide head, which "
                          f"not every backend runs; pin the DiT's attention without decoders")
    dev = torch.device(device)
    if dev.type != "cuda" and any(m.endswith("graph") for m in modes):
        raise BackendError(f"CUDA graphs need a CUDA device, not {device}: on the CPU choose eager or compile")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    made = {name: random_decoder(name, dev, dtype) for name in decoders}  # diffusers missing: refused here
    with torch.device(dev):
        model = WanDiT(cfg).to(dtype).eval()
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=gen)
    models, recipes = {None: model}, {}
    for activations in fp8:
        models[activations], recipes[activations] = fp8_copy(model, activations, calibration_text=text)
    resident = sum(tensor_bytes(m) for m in models.values()) + sum(tensor_bytes(getattr(d, "vae", d))
                                                                   for d in made.values())
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
            result, latents = bench_mode(bench_model, mode, text, blocks, seed + 2, dtype, dev, resident, made, profile)
        result["fp8"] = activations
        reference = latents if reference is None else reference
        result["max_abs_diff_vs_first_mode"] = float((latents - reference).abs().max())
        if peak:
            result["floor_share"] = report["floor"]["mean_floor_ms"] / result["block_mean_ms"]
        report["modes"].append(result)
    return report


def table(report: dict) -> str:
    """One line per path: the numbers the issue's targets are stated in; then each path's decoded runs
    and its profile by kernel kind."""
    head = (f"{report['config']} on {report['device']} ({report['dtype']}, {report['resolution']}, batch 1, "
            f"{report['steps']} steps, blocks of {report['block_frames']}, {report['blocks']} blocks, "
            f"window {report['window_frames']} / sink {report['sink_frames']}, SDPA {report['attention']}; "
            f"{report['floor']['mean_block_tflop']:.2f} TFLOP per block on average)")
    rows = [head, f"{'mode':<20}{'first ms':>10}{'median ms':>11}{'p99 ms':>9}{'mean ms':>9}{'full ms':>9}"
                  f"{'filling':>9}{'video fps':>11}{'peak GB':>9}{'floor':>7}{'diff':>10}"]
    for m in report["modes"]:
        full = f"{m['full_window_median_ms']:.1f}" if m["full_window_blocks"] else "-"
        filling = f"{m['filling_block_mean_ms']:.1f}" if m["filling_blocks"] else "-"
        share = f"{m['floor_share']:.0%}" if "floor_share" in m else "-"
        label = m["mode"] + (f" fp8-{m['fp8']}" if m.get("fp8") else "")
        rows.append(f"{label:<20}{m['first_block_ms']:>10.1f}{m['block_median_ms']:>11.1f}{m['block_p99_ms']:>9.1f}"
                    f"{m['block_mean_ms']:>9.1f}{full:>9}{filling:>9}{m['video_fps']:>11.2f}{gigabytes(m):>9}"
                    f"{share:>7}{m['max_abs_diff_vs_first_mode']:>10.2e}")
    rows.append("(full: median block at a full window, of those blocks; filling: mean of the blocks before)")
    if report["floor"].get("mean_floor_ms"):
        rows.append(f"bf16 floor {report['floor']['mean_floor_ms']:.1f} ms per block at the measured "
                    f"{report['floor']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    for m in report["modes"]:
        if m["decoded"]:
            rows.append(f"{m['mode']} with decode (first frame: noise of block 1 to its frames; interval: between "
                        f"ready blocks)")
            rows.append(f"  {'decoder':<9}{'overlap':>8}{'first ms':>10}{'median ms':>11}{'p99 ms':>9}"
                        f"{'decode ms':>11}{'video fps':>11}{'vs none':>9}{'peak GB':>9}")
        for d in m["decoded"]:
            decode = f"{d['decode_median_ms']:.1f}" if d["decode_median_ms"] is not None else "-"
            rows.append(f"  {d['decoder']:<9}{'yes' if d['overlap'] else 'no':>8}{d['first_frame_ms']:>10.1f}"
                        f"{d['block_median_ms']:>11.1f}{d['block_p99_ms']:>9.1f}{decode:>11}{d['video_fps']:>11.2f}"
                        f"{d['fps_vs_no_decoder']:>9.1%}{gigabytes(d):>9}")
        if "profile" in m:
            rows.append(f"{m['mode']} profile of one block at a {m['profile']['span_frames']}-frame span: "
                        + "\n".join(kernel_profile.lines(m["profile"], "block")))
    return "\n".join(rows)


def gigabytes(row: dict) -> str:
    return f"{row['peak_memory_bytes'] / 1e9:.2f}" if row["peak_memory_bytes"] is not None else "-"
