"""GPU benchmark of the runtime against the loops a PyTorch user writes, in one run.

    python scripts/bench_runtime.py --configs tiny,base,seed880m --json bench.json

Per config (batch 1, 4 DDIM steps, 64x64 except tiny's 32x32), per-frame latency of:
  eager-fp32      the seed-style loop: fp32, no graphs (what the public roadmap measured)
  eager-fp16      the same loop in fp16
  compile-fp16    torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs) on both graphs
  runtime-fp16    mirage.runtime.Pipeline: the whole frame in one CUDA graph, copy-stream I/O
and the floor: max(FLOPs / measured bf16 matmul peak, weight+activation bytes / measured copy
bandwidth). Weights are random (speed does not depend on their values). Prints a table
last and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from mirage.runtime import Pipeline
from mirage.train.config import get_config
from mirage.train.model import MirageUNet, parameter_count


def measured_peaks() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    copy_s = timed(lambda: y.copy_(x))
    mm_s = timed(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * x.numel() * 4 / copy_s, "bf16_flops_per_s": 2 * 8192 ** 3 / mm_s}


def floor(model: MirageUNet, steps: int, peaks: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    pipe = Pipeline.from_model(model, "cuda", "float16", steps=steps, cuda_graph=False)
    pipe.reset(0)
    with FlopCounterMode(display=False) as counter:
        pipe.step()
    flops = counter.get_total_flops()
    weights = parameter_count(model) * 2
    ctx_weights = parameter_count(model.context) * 2
    bytes_moved = (weights - ctx_weights) * steps + ctx_weights  # each step reads the denoiser's weights once
    pipe.close()
    t_math, t_mem = flops / peaks["bf16_flops_per_s"], bytes_moved / peaks["copy_bytes_per_s"]
    return {"flops": flops, "weight_bytes": bytes_moved, "math_ms": t_math * 1e3, "memory_ms": t_mem * 1e3,
            "floor_ms": max(t_math, t_mem) * 1e3}


def time_pipeline(pipe: Pipeline, frames: int, warmup: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe.reset(0)
    pipe.step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        pipe.step()
    times = []
    for _ in range(frames):
        t = time.perf_counter()
        pipe.step()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99)),
            "fps": 1e3 / statistics.mean(times), "first_frame_ms": first * 1e3,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}


def random_model(name: str) -> MirageUNet:
    torch.manual_seed(0)
    model = MirageUNet(get_config(name))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():  # zero-initialised output layers: give them real values
                p.normal_(0, 0.02)
    return model


def graph_vs_eager(name: str, frames: int = 5) -> dict:
    """Max |difference| between CUDA-graph replay and eager frames (same seed, fp32)."""
    outs = []
    for graph in (False, True):
        with Pipeline.from_model(random_model(name), "cuda", "float32", cuda_graph=graph) as pipe:
            pipe.reset(0)
            outs.append(np.stack([pipe.step() for _ in range(frames)]))
    return {"max_abs_diff": float(np.abs(outs[0] - outs[1]).max()), "frames": frames}


def overlap(name: str, frames: int = 200) -> dict:
    """Video-to-video: sequential step() vs. stream() with one frame in flight."""
    model = MirageUNet(get_config(name, "v2v"))
    size = model.cfg.image_size
    inputs = [np.random.default_rng(i).uniform(-1, 1, (size, size, 3)).astype(np.float32) for i in range(frames)]
    res = {}
    with Pipeline.from_model(model, "cuda", "float16") as pipe:
        for mode in ("step", "stream"):
            pipe.reset(0)
            list(pipe.stream(inputs[:10]))
            pipe.reset(0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            if mode == "step":
                for x in inputs:
                    pipe.step(x)
            else:
                for _ in pipe.stream(inputs):
                    pass
            res[f"{mode}_ms_per_frame"] = (time.perf_counter() - t) * 1e3 / frames
        tl = pipe.timeline[10:]
        res["timeline_median_ms"] = {k: statistics.median(r[k] for r in tl) for k in tl[0] if k != "frame"}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,base,seed880m")
    p.add_argument("--variants", default="eager-fp32,eager-fp16,compile-fp16,runtime-fp16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--json", default="bench.json")
    p.add_argument("--skip-checks", action="store_true", help="skip the graph-vs-eager and overlap checks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the seed-style loop
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "date": time.strftime("%Y-%m-%d"), "peaks": measured_peaks(), "configs": {}}
    print(f"device {report['device']}: copy {report['peaks']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {report['peaks']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    if not args.skip_checks:
        report["graph_vs_eager_tiny_fp32"] = graph_vs_eager("tiny")
        print("graph vs eager (tiny fp32):", report["graph_vs_eager_tiny_fp32"], flush=True)
        report["overlap_tiny_v2v"] = overlap("tiny")
        print("overlap (tiny v2v):", report["overlap_tiny_v2v"], flush=True)
    for name in args.configs.split(","):
        model = random_model(name)
        entry = {"parameters": parameter_count(model), "floor": floor(model, args.steps, report["peaks"]),
                 "variants": {}}
        print(f"{name}: floor {entry['floor']}", flush=True)
        for variant in args.variants.split(","):
            kind, prec = variant.split("-")
            dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[prec]
            t = time.perf_counter()
            pipe = Pipeline.from_model(model, "cuda", dtype, steps=args.steps, cuda_graph=kind == "runtime",
                                       compile_mode="reduce-overhead" if kind == "compile" else None)
            frames = args.frames if name != "seed880m" else max(30, args.frames // 2)
            res = time_pipeline(pipe, frames, warmup=3 if kind != "compile" else 5)
            res["setup_s"] = time.perf_counter() - t  # compile time for compile-*, capture for runtime-*
            pipe.close()
            entry["variants"][variant] = res
            print(f"  {variant:<14} median {res['median_ms']:8.3f} ms  p99 {res['p99_ms']:8.3f}  "
                  f"fps {res['fps']:8.1f}  setup {res['setup_s']:6.1f} s  mem {res['peak_mem_mb']:8.0f} MiB",
                  flush=True)
            model = model.float()
            torch.compiler.reset()
        report["configs"][name] = entry
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{'config':<9} {'variant':<14} {'median ms':>10} {'p99 ms':>9} {'FPS':>8} {'x floor':>8} {'vs compile':>10}")
    for name, entry in report["configs"].items():
        fl = entry["floor"]["floor_ms"]
        comp = entry["variants"].get("compile-fp16", {}).get("median_ms")
        for variant, r in entry["variants"].items():
            speed = f"{comp / r['median_ms']:.2f}x" if comp else "-"
            print(f"{name:<9} {variant:<14} {r['median_ms']:>10.3f} {r['p99_ms']:>9.3f} {r['fps']:>8.1f} "
                  f"{r['median_ms'] / fl:>8.1f} {speed:>10}")
        print(f"{name:<9} {'floor':<14} {fl:>10.3f}   ({'memory' if fl == entry['floor']['memory_ms'] else 'math'}-bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
