"""Time the fused temporal-attention kernel against the stock-op PyTorch version (GPU).

    python scripts/bench_temporal_attention.py --library build/libmirage_kernels.so --json ta.json

The temporal-attention layers of `base` and `seed880m` (K = 8, D = 256, 8 heads, fp16, q/k/v as
strided chunks of the qkv projection): the fused kernel vs the stock ops eager and compiled, each
as CUDA-graph replays (mirage.plugins_cpp.bench), with the bytes moved and the achieved bandwidth
against the measured copy bandwidth. Correctness is tests/gpu/test_gpu_temporal_attention.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mirage.model.unet import temporal_attention
from mirage.plugins_cpp import kernels
from mirage.plugins_cpp.bench import copy_bandwidth, device_ms

LAYERS = [("base/seed880m 16x16 layer", 256), ("base/seed880m 8x8 layer", 64)]


def layer_inputs(n: int, b=1, d=256, k=8, total=704, seed=1):
    """q/k/v chunks of one (B, N, 3D) projection, the ring buffer, ages 1..K shuffled, age table (fp16)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").half()  # noqa: E731
    ages = (torch.randperm(k, generator=g, device="cuda") + 1).int()[None].repeat(b, 1)
    return (*r(b, n, 3 * d).chunk(3, dim=-1), r(b, k, 2, total, d), ages, r(k + 1, d) * 0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", default="build/libmirage_kernels.so")
    p.add_argument("--json", default="temporal_attention.json")
    args = p.parse_args()
    lib = kernels.load(args.library)
    peak = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_s": peak, "layers": []}
    stock = torch.compile(temporal_attention)
    heads, k, d = 8, 8, 256
    for name, n in LAYERS:
        q, ks, vs, mem, ages, table = layer_inputs(n)
        ref_args = (q, ks, vs, mem[:, :, :, :n], ages.long(), table, heads)  # the model's call
        us = {"kernel_us": device_ms(lambda: kernels.temporal_attention(lib, q, ks, vs, mem, ages, table, heads)),
              "stock_eager_us": device_ms(lambda: temporal_attention(*ref_args)),
              "stock_compiled_us": device_ms(lambda: stock(*ref_args))}
        us = {key: ms * 1e3 for key, ms in us.items()}
        moved = (4 * n * d + k * 2 * n * d) * 2  # q, k, v, out + this layer's memory, fp16
        row = {"layer": name, "tokens": n, **us, "bytes": moved, "kernel_GBps": moved / us["kernel_us"] / 1e3,
               "floor_us": moved / peak * 1e6}
        report["layers"].append(row)
        print(f"{name}: kernel {row['kernel_us']:.1f} us, stock eager {row['stock_eager_us']:.1f} us, stock compiled "
              f"{row['stock_compiled_us']:.1f} us; {moved / 1e6:.2f} MB -> {row['kernel_GBps']:.0f} GB/s "
              f"(floor {row['floor_us']:.2f} us at the measured {peak / 1e12:.2f} TB/s)", flush=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
