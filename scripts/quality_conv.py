"""Quality cost of packed / FP8 convolution weights on a video-to-video model (issue 17: FP8 within
0.5 dB of fp16 over 500 frames).

    python scripts/quality_conv.py checkpoints/tiny-v2v --frames 500 --json q.json            # CPU
    python scripts/quality_conv.py CKPT --device cuda --dtype float16 --frames 500 --json q.json  # GPU

The same synthetic clip as mirage-quality (mirage.bridge.quality) goes through the runtime
Pipeline twice: the stock model, and the model whose 3x3 convolutions of at most --max-pixels
pixels are PackedConv3x3 with FP8 E4M3 weights (mirage.plugins_cpp.conv.pack_convolutions). On
the CPU the packed layers run F.conv2d on the dequantised weights (fp32), on CUDA the Triton
kernel. Prints PSNR against the ground truth per window and the difference, writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mirage.core import metrics as M
from mirage.core.config import PipelineOptions
from mirage.plugins_cpp.conv import pack_convolutions
from mirage.bridge.pipeline import from_model
from mirage.bridge.quality import reference_clip, v2v_inputs
from mirage.train.checkpoint import load_checkpoint


def rollout(checkpoint: str, truth: np.ndarray, args, weights: str | None) -> tuple[np.ndarray, list[str]]:
    model, _ = load_checkpoint(checkpoint)
    if not model.cfg.cond_channels:
        raise SystemExit(f"{checkpoint}: a video-to-video checkpoint is needed (PSNR against the input's ground truth)")
    packed = []
    if weights:
        cfg = model.cfg
        s = cfg.image_size
        example = (torch.zeros(1, cfg.channels, s, s), torch.zeros(1), torch.zeros(1, cfg.channels, s, s),
                   torch.zeros(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim),
                   torch.zeros(1, cfg.context_frames, dtype=torch.long))
        packed = pack_convolutions(model.eval(), lambda: model.denoise(*example), args.max_pixels, weights)
    with from_model(model, args.device, PipelineOptions(dtype=args.dtype)) as pipe:
        pipe.reset(args.seed)
        return np.stack(list(pipe.stream(list(v2v_inputs(truth))))), packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--max-pixels", type=int, default=256)
    p.add_argument("--weights", default="fp8", choices=["fp8", "native"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="quality_conv.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.checkpoint)
    truth = reference_clip(model.cfg.image_size, args.frames, 10_000 + args.seed)  # mirage-quality's clip
    stock, _ = rollout(args.checkpoint, truth, args, None)
    packed, layers = rollout(args.checkpoint, truth, args, args.weights)
    psnr = {"stock": M.psnr(stock, truth), args.weights: M.psnr(packed, truth)}
    windows = [{"start": s, **{k: float(v[s:s + args.window].mean()) for k, v in psnr.items()}}
               for s in range(0, args.frames - args.window + 1, args.window)]
    report = {"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype, "frames": args.frames,
              "weights": args.weights, "packed_layers": layers, "windows": windows,
              "psnr_stock_db": float(psnr["stock"].mean()), "psnr_packed_db": float(psnr[args.weights].mean()),
              "psnr_packed_vs_stock_db": float(M.psnr(packed, stock).mean())}
    print(f"{len(layers)} convolutions packed ({args.weights}, <= {args.max_pixels} pixels)")
    print(f"{'frames':>10} {'stock dB':>9} {args.weights + ' dB':>9} {'diff':>6}")
    for w in windows:
        print(f"{w['start']:>4}-{w['start'] + args.window:<5} {w['stock']:>9.2f} {w[args.weights]:>9.2f} "
              f"{w[args.weights] - w['stock']:>+6.2f}")
    print(f"mean: stock {report['psnr_stock_db']:.2f} dB, {args.weights} {report['psnr_packed_db']:.2f} dB "
          f"({report['psnr_packed_db'] - report['psnr_stock_db']:+.2f}); {args.weights} vs stock output "
          f"{report['psnr_packed_vs_stock_db']:.1f} dB")
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
