"""Reconstruction PSNR/SSIM of an autoencoder on held-out synthetic clips and photo pans.

    python scripts/eval_autoencoder.py checkpoints/ae-tiny --sizes 256 512 --json docs/quality/ae-tiny.json

Prints a table, writes JSON (and, with --png, input | reconstruction pictures per source at the
largest size). A TAESD folder in diffusers' layout works in place of a checkpoint.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mirage.core.config import to_json
from mirage.train.ae_eval import HELD_OUT_SEED, reconstruction_quality
from mirage.train.autoencoder import load_autoencoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--data", nargs="+", default=["detailed", "synthetic", "photos"])
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="data seed (training used its own --seed)")
    ap.add_argument("--clips", type=int, default=11)
    ap.add_argument("--frames", type=int, default=3, help="frames per clip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="folder for input | reconstruction pictures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_autoencoder(args.checkpoint, device=args.device)
    rows = []
    print(f"{'data':<10} {'size':>5} {'frames':>6} {'PSNR dB':>8} {'min':>6} {'SSIM':>6} {'s':>5}")
    for size in args.sizes:
        for data in args.data:
            start = time.perf_counter()
            row = reconstruction_quality(model, data, size, args.seed, args.clips, args.frames, device=args.device)
            example = row.pop("example")
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(f"{data:<10} {size:>5} {row['frames']:>6} {row['psnr']:>8.2f} {row['psnr_min']:>6.2f} "
                  f"{row['ssim']:>6.3f} {row['seconds']:>5.0f}", flush=True)
            if args.png and size == max(args.sizes):
                from PIL import Image

                args.png.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.concatenate(example, axis=1)).save(args.png / f"ae_{data}_{size}.png")
    if args.json:
        report = {"checkpoint": args.checkpoint, "step": meta.get("step"), "autoencoder": to_json(model.cfg),
                  "device": str(args.device), "threads": args.threads, "date": datetime.date.today().isoformat(),
                  "command": "python " + " ".join(sys.argv), "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
