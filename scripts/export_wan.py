"""Export wan-1.3b's graphs (dit_text, dit_step, dit_cache_write) to ONNX once and record what it costs.

    python scripts/export_wan.py --out artifacts/wan-1.3b-onnx                    # random weights, fp16
    python scripts/export_wan.py --weights self_forcing_dmd.pt --out artifacts/wan # a checkpoint's weights
    python scripts/export_wan.py --decoder taew2_1.pth --out artifacts/wan-taehv    # + TAEHV's encode / decode

Weights go to external data (ONNX protobufs stop at 2 GB). No parity: a recorded rollout of wan-1.3b at
832x480 is hours on a CPU (on the GPU machine, `mirage-export --dit wan-1.3b` records one and checks it).
Prints, and writes OUT/export_report.json: seconds, bytes written and the peak resident memory per graph
(mirage.export.dit_export.export_dit_onnx).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from mirage.bridge.dit_artifact import taehv_config
from mirage.core.config import get_dit_config
from mirage.core.errors import MirageError
from mirage.core.report import write_json
from mirage.export.dit_export import DIT_DTYPES, export_dit_onnx
from mirage.model.dit import WanDiT
from mirage.model.wan_checkpoint import default_dtype, load_dit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--weights", default=None, help="a Wan 2.1 DiT checkpoint (default: random weights, seed 0)")
    p.add_argument("--precision", choices=list(DIT_DTYPES), default="fp16")
    p.add_argument("--decoder", default=None,
                   help="a TAEHV file (taew2_1.pth): its encode / decode graphs too, as mirage-export --decoder's")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg, dtype = get_dit_config(args.config), DIT_DTYPES[args.precision]
        exported, taehv = taehv_config(cfg, args.decoder)  # a bad --decoder is refused before the DiT loads
        if args.weights:
            model, _ = load_dit(args.weights, cfg, dtype=dtype)
        else:  # built in its dtype: no float32 copy of 1.3B parameters on the way
            torch.manual_seed(0)
            with default_dtype(dtype):
                model = WanDiT(cfg)
        model = model.eval().requires_grad_(False)
        model.cfg = exported
        built = time.perf_counter() - start
        report = export_dit_onnx(model, args.out, args.precision,
                                 lambda s: print(f"[{time.perf_counter() - start:7.1f}s] {s}", flush=True), taehv)
    except MirageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"config": cfg.name, "precision": args.precision, "weights": args.weights or "random (seed 0)",
               "decoder": args.decoder,
               "params": cfg.param_count(), "model_seconds": built, "graphs": report,
               "total_seconds": time.perf_counter() - start}
    for graph, r in report.items():
        print(f"{graph:<16} {r['seconds']:7.1f} s  {r['bytes'] / 2**30:6.2f} GiB  "
              f"(peak RSS {r['peak_rss_bytes'] / 2**30:.1f} GiB)  {', '.join(r['files'])}")
    write_json(f"{args.out}/export_report.json", summary)
    print(f"total {summary['total_seconds']:.1f} s; wrote {args.out}/export_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
