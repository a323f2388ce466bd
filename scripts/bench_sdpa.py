"""Time PyTorch's SDPA backends on the DiT's attention shapes (GPU): which backend bounds a block.

    python scripts/bench_sdpa.py                       # wan-1.3b at 832x480: filling and full window
    python scripts/bench_sdpa.py --config wan-1.3b-longlive

One self-attention call of a block (batch 1): the block's queries (block_frames x tokens per frame)
against every key it reads (the held frames plus its own), heads x head_dim as the config says, bf16,
no mask (the DiT's block step attends over a contiguous span). Each backend that accepts the shape is
timed with CUDA events (mirage.plugins_cpp.bench.device_ms: warm-up, then the median of the calls);
TFLOP/s counts QK^T and PV at 2 FLOPs per multiply-add (4 * Lq * Lk * dim), as DiTConfig.block_flops
does. Prints a table and writes the JSON (default docs/bench/<date>_<gpu>_sdpa_<config>.json).
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mirage.core.config import get_dit_config
from mirage.core.report import device_tag, write_json
from mirage.plugins_cpp.bench import device_ms

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backends(heads: int, head_dim: int, queries: int, keys: int) -> dict[str, dict]:
    q = torch.randn(1, heads, queries, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, heads, keys, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 4 * queries * keys * heads * head_dim
    out = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                ms = device_ms(lambda: F.scaled_dot_product_attention(q, k, v), calls=20)
        except RuntimeError as err:  # the backend refuses this shape / dtype / GPU
            out[name] = {"error": str(err).splitlines()[0][:160]}
            continue
        out[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_sdpa needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = get_dit_config(args.config)
    t, n = cfg.tokens_per_frame, cfg.block_frames
    spans = {"first block": n, "full window": cfg.window_frames}  # frames of keys a block reads
    report = {"config": cfg.name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "heads": cfg.num_heads, "head_dim": cfg.dim // cfg.num_heads, "queries": n * t, "cases": {}}
    print(f"{cfg.name} on {report['device']}: {cfg.num_heads} heads x {report['head_dim']}, {n * t} queries, bf16")
    print(f"{'case':<12} {'keys':>6} " + " ".join(f"{b:>18}" for b in BACKENDS))
    for case, frames in spans.items():
        res = time_backends(cfg.num_heads, cfg.dim // cfg.num_heads, n * t, frames * t)
        report["cases"][case] = {"keys": frames * t, **res}
        cells = [f"{r['ms']:7.3f} ms {r['tflops']:4.0f} TF" if "ms" in r else f"{'refused':>18}" for r in res.values()]
        print(f"{case:<12} {frames * t:>6} " + " ".join(cells))
    path = args.json or f"docs/bench/{datetime.date.today()}_{device_tag(report['device'])}_sdpa_{cfg.name}.json"
    write_json(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
