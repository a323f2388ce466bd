"""Build the CUDA kernel library, check it against a float64 reference, and time it (GPU).

    python scripts/check_kernels.py --build build --json kernels.json

Correctness: random inputs (fresh per check), outputs poisoned with NaN first, ages with
empty slots and wrapped-around orders, several shapes (head width below, at and above a
warp), fp32/fp16/bf16; ‖out − ref‖ / ‖ref‖ against PyTorch float64 of the same function.
Timing (CUDA-graph replays, so host launch cost is excluded): the temporal-attention layers of `base` and `seed880m` (K = 8, D = 256, 8 heads):
the fused kernel vs. the stock-op PyTorch version (cat + SDPA) eager and compiled, with the
bytes-moved floor and the achieved bandwidth.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from mirage.plugins_cpp import kernels
from mirage.model.unet import temporal_attention

BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def inputs(b, n, d, k, total, dtype, seed, fused_qkv=False):
    """Random q, k_self, v_self, memory, ages (30% empty, shuffled: a wrapped ring), age table;
    with fused_qkv, q/k/v are the strided chunks of one (B, N, 3D) tensor, as the model has them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    ages = torch.stack([torch.randperm(k, generator=g, device="cuda") for _ in range(b)]).int() + 1
    ages[torch.rand(b, k, generator=g, device="cuda") < 0.3] = 0  # empty slots
    qkv = r(b, n, 3 * d).chunk(3, dim=-1) if fused_qkv else (r(b, n, d), r(b, n, d), r(b, n, d))
    return *qkv, r(b, k, 2, total, d), ages, r(k + 1, d) * 0.1


def check(lib, b, n, d, k, heads, total, offset, dtype, seed, fused_qkv=False) -> float:
    q, ks, vs, mem, ages, table = inputs(b, n, d, k, total, dtype, seed, fused_qkv)
    out = torch.full((b, n, d), float("nan"), dtype=dtype, device="cuda")
    kernels.temporal_attention(lib, q, ks, vs, mem, ages, table, heads, offset, out=out)
    torch.cuda.synchronize()
    f64 = lambda x: x.double()  # noqa: E731
    ref = temporal_attention(f64(q), f64(ks), f64(vs), f64(mem[:, :, :, offset:offset + n]), ages.long(),
                             f64(table), heads)
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm())


def bench(fn, calls=50) -> float:
    """Device time per call in ms: `calls` calls captured in one CUDA graph, replays timed with
    events (host launch cost, e.g. ctypes, stays out of the number)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device copy, measured here."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x), calls=5) * 1e-3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="build")
    p.add_argument("--json", default="kernels.json")
    args = p.parse_args()
    subprocess.run(["cmake", "-S", ".", "-B", args.build, "-DCMAKE_CUDA_ARCHITECTURES=90"], check=True)
    subprocess.run(["cmake", "--build", args.build, "-j"], check=True)
    lib = kernels.load(Path(args.build) / "libmirage_kernels.so")
    report = {"device": torch.cuda.get_device_name(), "checks": [], "timing": []}
    shapes = [(1, 64, 64, 4, 4, 704, 320), (2, 256, 256, 8, 8, 704, 0), (1, 64, 256, 8, 8, 704, 640),
              (1, 16, 128, 3, 1, 16, 0), (3, 32, 512, 32, 8, 100, 50), (1, 8, 64, 1, 32, 8, 0)]
    worst = 0.0
    for dtype, bound in BOUNDS.items():
        for i, shape in enumerate(shapes):
            for fused_qkv in (False, True):
                rel = check(lib, *shape, dtype, seed=100 * i + 7, fused_qkv=fused_qkv)
                ok = rel <= bound
                worst = max(worst, rel / bound)
                report["checks"].append({"shape": shape, "dtype": str(dtype), "strided_qkv": fused_qkv, "rel": rel,
                                         "ok": ok})
                print(f"check {dtype!s:14} B,N,D,K,heads,total,offset={shape} strided q/k/v={fused_qkv!s:5}: "
                      f"rel {rel:.2e} {'ok' if ok else 'FAIL'}")
    bad = torch.zeros(1, 4, 96, device="cuda")
    try:  # unsupported shapes are refused, not run
        kernels.temporal_attention(lib, bad, bad, bad, torch.zeros(1, 40, 2, 4, 96, device="cuda"),
                                   torch.ones(1, 40, dtype=torch.int32, device="cuda"), torch.zeros(41, 96, device="cuda"),
                                   3, 0)
        report["refuses_k40"] = False
    except kernels.KernelError:
        report["refuses_k40"] = True
    print("refuses K=40:", report["refuses_k40"])

    peak_bw = report["copy_bytes_per_s"] = copy_bandwidth()
    stock = torch.compile(temporal_attention)
    for name, n in [("base/seed880m 16x16 layer", 256), ("base/seed880m 8x8 layer", 64)]:
        b, d, k, heads, total = 1, 256, 8, 8, 704
        q, ks, vs, mem, ages, table = inputs(b, n, d, k, total, torch.float16, 1, fused_qkv=True)
        args_ref = (q, ks, vs, mem[:, :, :, :n], ages.long(), table, heads)  # the model's call
        fused = (*args_ref[:3], mem, ages, table, heads, 0)  # the ring buffer read in place at offset 0
        t_kernel = bench(lambda a=fused: kernels.temporal_attention(lib, *a))
        t_eager = bench(lambda a=args_ref: temporal_attention(*a))
        t_comp = bench(lambda a=args_ref: stock(*a))
        moved = (4 * b * n * d + b * k * 2 * n * d) * 2  # q, k, v, out + this layer's memory, fp16
        row = {"layer": name, "tokens": n, "kernel_us": t_kernel * 1e3, "stock_eager_us": t_eager * 1e3,
               "stock_compiled_us": t_comp * 1e3, "bytes": moved, "kernel_GBps": moved / (t_kernel * 1e-3) / 1e9,
               "floor_us": moved / peak_bw * 1e6}
        report["timing"].append(row)
        print(f"{name}: kernel {row['kernel_us']:.1f} us, stock eager (cat + SDPA) {row['stock_eager_us']:.1f} us, "
              f"stock compiled {row['stock_compiled_us']:.1f} us; {moved / 1e6:.2f} MB -> {row['kernel_GBps']:.0f} "
              f"GB/s (floor {row['floor_us']:.2f} us at the measured {peak_bw / 1e12:.2f} TB/s)")
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"worst error / bound: {worst:.3f}")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
