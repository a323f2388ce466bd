"""Time PyTorch's SDPA backends on the DiT's attention shapes (GPU): which backend bounds a block.

    python scripts/bench_sdpa.py                       # wan-1.3b at 832x480: filling and full window
    python scripts/bench_sdpa.py --config wan-1.3b-longlive
    python scripts/bench_sdpa.py --batch 2 --masked    # also as the runtime's block graph calls it

One self-attention call of a block (--batch rows): the block's queries (block_frames x tokens per frame)
against every key it reads (the held frames plus its own), heads x head_dim as the config says, bf16,
no mask (BlockStepper's block step attends over a contiguous span). With --masked each case runs again
as the runtime's pure block graph (mirage.model.dit_graphs.cached_pass) calls it: over the whole window's
keys with a boolean mask of the rows held, (B, 1, queries, window) expanded from (B, window), which
rules out the flash backend and makes cuDNN read a bias. Each backend that accepts the shape is
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


def time_backends(heads: int, head_dim: int, queries: int, keys: int, batch: int = 1,
                  window: int | None = None, mask: str = "bool") -> dict[str, dict]:
    """Each backend on `keys` keys, or with `window` on that many keys of which the first `keys` are masked in:
    by a boolean mask (B, 1, queries, window) as cached_pass builds it (`mask` "bool"), or by an additive float
    bias broadcast over the queries, (B, 1, 1, window) ("bias"). TFLOP/s counts the keys attended (`keys`), so
    a mask's wasted work shows as a lower rate."""
    q = torch.randn(batch, heads, queries, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, window or keys, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    attn_mask = None
    if window:
        held = (torch.arange(window, device="cuda") < keys).expand(batch, window)[:, None, None, :]
        attn_mask = (held.expand(-1, 1, queries, -1) if mask == "bool" else
                     torch.zeros(held.shape, dtype=q.dtype, device="cuda").masked_fill(~held, float("-inf")))
    flops = 4 * batch * queries * keys * heads * head_dim
    out = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                ms = device_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), calls=20)
        except RuntimeError as err:  # the backend refuses this shape / dtype / GPU
            out[name] = {"error": str(err).splitlines()[0][:160]}
            continue
        out[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    return out


def time_varlen(heads: int, head_dim: int, queries: int, keys: int, batch: int, window: int) -> dict:
    """The held prefix of each row's window by torch's variable-length attention (flash), with no mask: the
    rows' windows packed (B·window, heads, dim), each row's held keys one sequence and the rest of its window a
    sequence of no queries, so every row keeps its own window's offset."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        return {"error": f"torch {torch.__version__}: {err}"}
    q = torch.randn(batch * queries, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch * window, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    held = torch.full((batch,), keys, device="cuda", dtype=torch.int32)
    starts = torch.arange(batch, device="cuda", dtype=torch.int32)
    cu_k = torch.stack([starts * window, starts * window + held], 1).flatten()
    cu_k = torch.cat([cu_k, cu_k.new_tensor([batch * window])])
    cu_q = torch.stack([starts * queries, (starts + 1) * queries], 1).flatten()
    cu_q = torch.cat([cu_q, cu_q.new_tensor([batch * queries])])
    flops = 4 * batch * queries * keys * heads * head_dim
    try:
        ms = device_ms(lambda: varlen_attn(q, k, v, cu_q, cu_k, queries, window), calls=20)
    except (RuntimeError, TypeError) as err:
        return {"error": str(err).splitlines()[0][:160]}
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--batch", type=int, default=1, help="rows (served streams) per call")
    p.add_argument("--masked", action="store_true", help="each case again as the runtime's graph calls it: "
                   "the whole window's keys under a boolean mask")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_sdpa needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = get_dit_config(args.config)
    t, n = cfg.tokens_per_frame, cfg.block_frames
    spans = {"first block": n, "full window": cfg.window_frames}  # frames of keys a block reads
    report = {"config": cfg.name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "heads": cfg.num_heads, "head_dim": cfg.dim // cfg.num_heads, "queries": n * t, "batch": args.batch,
              "cases": {}}
    print(f"{cfg.name} on {report['device']}: {cfg.num_heads} heads x {report['head_dim']}, {n * t} queries, bf16, "
          f"batch {args.batch}")
    print(f"{'case':<26} {'keys':>6} " + " ".join(f"{b:>18}" for b in (*BACKENDS, "varlen (flash)")))
    window = cfg.window_frames * t
    cases = [(case, frames, None, None) for case, frames in spans.items()]
    if args.masked:
        cases += [(f"{case}, window {how}", frames, window, how) for case, frames in spans.items()
                  for how in ("bool", "bias")]
    for case, frames, masked, how in cases:
        res = time_backends(cfg.num_heads, cfg.dim // cfg.num_heads, n * t, frames * t, args.batch, masked, how)
        if masked and how == "bool":
            res["varlen"] = time_varlen(cfg.num_heads, cfg.dim // cfg.num_heads, n * t, frames * t, args.batch, window)
        report["cases"][case] = {"keys": frames * t, "window_keys": masked, "mask": how, **res}
        cells = [f"{r['ms']:7.3f} ms {r['tflops']:4.0f} TF" if "ms" in r else f"{'refused':>18}" for r in res.values()]
        print(f"{case:<26} {frames * t:>6} " + " ".join(cells))
    tag = (f"_b{args.batch}" if args.batch > 1 else "") + ("_masked" if args.masked else "")
    path = args.json or f"docs/bench/{datetime.date.today()}_{device_tag(report['device'])}_sdpa_{cfg.name}{tag}.json"
    write_json(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
