"""Time the runtime's DiT block as mirage-serve steps it (GPU): where a served block's time goes.

    python scripts/bench_dit_block.py                              # wan-1.3b, random TAEHV, strength 0.6, batch 1,2
    python scripts/bench_dit_block.py --batches 2 --kernels compile --attention auto,cudnn,efficient

The pipeline is the server's (mirage.bridge.pipeline.from_dit_model: the DiT's pure graphs on the PyTorch
backend, bf16, the whole block in one CUDA graph, uint8 frames; --kernels: PyTorch's eager kernels, as mirage-serve
runs a DiT, and Inductor's, as mirage-serve --fast does) around random weights: a random WanDiT of
--config and a random TAEHV as its codec, video-to-video at --strength with max_strength = --strength (the
passes mirage-serve --max-strength runs). Per batch (rows = streams) it steps random input blocks until every
row's window is full, then times --blocks blocks by the runtime's own GPU events (the timeline's compute_ms:
the block graph on the GPU, no host time). Then full-window blocks run uncaptured (cuda_graph=False): one timed
by graph with CUDA events (encode, dit_step per pass, dit_cache_write, decode), one under torch.profiler by
kernel kind (mirage.core.kernel_profile). Each --attention value pins every SDPA call to one backend (auto: as
PyTorch picks). Prints a table and writes the JSON (default docs/bench/<date>_<gpu>_dit_block_<config>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import statistics
import sys

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mirage.bridge.pipeline import from_dit_model
from mirage.core import kernel_profile
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.report import device_tag, write_json
from mirage.model.dit import WanDiT
from mirage.model.taehv import Taehv
from mirage.model.wan_checkpoint import default_dtype

ATTENTION = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "flash": SDPBackend.FLASH_ATTENTION}
KERNELS = {"eager": None, "compile": "default"}  # PipelineOptions.compile


def full_window(pipe, seed: int) -> np.ndarray:
    """Reset the rows to `seed` and step random input blocks until every row's window is full (one block more);
    returns the input block, the same for the blocks after."""
    cfg = pipe.cfg
    frames = np.random.default_rng(seed).integers(0, 256, (pipe.batch, *pipe.input_shape), dtype=np.uint8)
    pipe.reset(seed)
    for _ in range(-(-cfg.window_frames // cfg.block_frames) + 1):  # blocks until the window is full, and one
        pipe.step_batch(frames)
    return frames


def block_rows(pipe, blocks: int, seed: int) -> dict:
    """Fill every row's window, then `blocks` timed blocks: GPU ms each (the runtime's events)."""
    frames = full_window(pipe, seed)
    pipe.timeline.clear()
    for _ in range(blocks):
        pipe.step_batch(frames)
    ms = [t["compute_ms"] for t in pipe.timeline]
    return {"block_ms": ms, "median_ms": statistics.median(ms), "max_ms": max(ms)}


def profile_block(pipe, seed: int) -> dict:
    """One full-window block, eager: GPU ms by graph (CUDA events around each graph's run), and its kernels by
    kind (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    backend = pipe.backend
    run, spans = backend.run, []

    def timed_run(graph, inputs, output):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(graph, inputs, output)
        end.record()
        spans.append((graph, start, end))

    frames = full_window(pipe, seed)
    torch.cuda.synchronize()
    backend.run = timed_run
    pipe.step_batch(frames)  # the block timed by graph
    torch.cuda.synchronize()
    by_graph: dict[str, dict] = {}
    for graph, start, end in spans:
        entry = by_graph.setdefault(graph, {"calls": 0, "gpu_ms": 0.0})
        entry["calls"] += 1
        entry["gpu_ms"] += start.elapsed_time(end)
    backend.run = run
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.step_batch(frames)
        torch.cuda.synchronize()
    kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"by_graph": by_graph, **kernel_profile.summarize(kernels, "block")}


def print_row(row: dict) -> None:
    head = f"{row['batch']:>5} {row['kernels']:>7} {row['attention']:>9}"
    if "error" in row:
        print(f"{head} refused: {row['error']}")
        return
    split = "  ".join(f"{g} {v['gpu_ms']:.1f}" + (f" x{v['calls']}" if v["calls"] > 1 else "")
                      for g, v in row.get("profile", {}).get("by_graph", {}).items())
    print(f"{head} {row['median_ms']:>10.1f} {row['max_ms']:>8.1f}  {split}")
    if "profile" in row:
        print("\n".join("      " + line for line in kernel_profile.lines(row["profile"], "block")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--batches", default="1,2", help="rows (served streams) per block, comma-separated")
    p.add_argument("--strength", type=float, default=0.6, help="video-to-video strength, and the max_strength")
    p.add_argument("--blocks", type=int, default=6, help="timed full-window blocks per batch")
    p.add_argument("--attention", default="auto", help=f"comma-separated, of {', '.join(ATTENTION)}")
    p.add_argument("--kernels", default="eager,compile", help="comma-separated, of eager (the graphs' PyTorch "
                   "kernels, as mirage-serve runs a DiT) and compile (Inductor's: mirage-serve --fast)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the eager profiled block")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_dit_block needs a CUDA GPU", file=sys.stderr)
        return 2
    attention, kernels = args.attention.split(","), args.kernels.split(",")
    if any(a not in ATTENTION for a in attention):
        p.error(f"--attention {args.attention}: choose from {', '.join(ATTENTION)}")
    if any(k not in KERNELS for k in kernels):
        p.error(f"--kernels {args.kernels}: choose from {', '.join(KERNELS)}")
    cfg = get_dit_config(args.config)
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16), torch.device("cuda"):
        model = WanDiT(cfg).requires_grad_(False)
    taehv = Taehv()
    text = np.random.default_rng(1).standard_normal((cfg.text_len, cfg.text_dim)).astype(np.float32)
    report = {"config": cfg.name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "strength": args.strength, "resolution": f"{cfg.width}x{cfg.height}", "block_frames": cfg.block_frames,
              "window_frames": cfg.window_frames, "video_frames_per_block": None, "rows": []}
    print(f"{cfg.name} on {report['device']}: runtime block (captured), strength {args.strength}, random weights")
    print(f"{'batch':>5} {'kernels':>7} {'attention':>9} {'median ms':>10} {'max ms':>8}  by graph (uncaptured, ms)")
    for batch, kind, name in itertools.product(map(int, args.batches.split(",")), kernels, attention):
        row = {"batch": batch, "kernels": kind, "attention": name}
        pin = ATTENTION[name]
        with sdpa_kernel(pin) if pin is not None else contextlib.nullcontext():
            try:
                for graph in (True, False) if args.profile else (True,):
                    options = PipelineOptions(batch=batch, strength=args.strength, max_strength=args.strength,
                                              frames="uint8", cuda_graph=graph, compile=KERNELS[kind])
                    with from_dit_model(model, "cuda", options, decoder=taehv) as pipe:
                        pipe.set_prompt(text)
                        report["video_frames_per_block"] = pipe.frames_per_step
                        if graph:
                            row.update(block_rows(pipe, args.blocks, seed=2))
                            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        else:
                            row["profile"] = profile_block(pipe, seed=2)
            except RuntimeError as err:  # a pinned backend that refuses the graphs' attention
                row["error"] = str(err).splitlines()[0][:200]
        report["rows"].append(row)
        print_row(row)
    path = args.json or f"docs/bench/{datetime.date.today()}_{device_tag(report['device'])}_dit_block_{cfg.name}.json"
    write_json(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
