"""What FP8 matmuls cost in quality: a clip from an FP8 copy of a DiT against the model in bf16 (GPU) or
float32 (CPU), per latent frame (mirage.model.fp8.fp8_rollout_psnr).

    python scripts/fp8_quality.py --config dit-tiny --checkpoint dit_tiny.safetensors --frames 500
    python scripts/fp8_quality.py --config wan-1.3b --checkpoint self_forcing_dmd.pt --frames 21 --device cuda
    python scripts/fp8_quality.py --config dit-tiny --device cpu --frames 8           # random weights
    python scripts/fp8_quality.py --restyle checkpoints/dit-tiny-taesd --frames 500 --device cuda

--restyle: a DiT trained here (on a per-frame autoencoder) restyles 500 video frames of its data at strength 0.5
(bridge/dit_quality.evaluate_dit) in its own dtype and with FP8 matmuls; the issue's measure is the mean PSNR
against the ground truth, FP8 minus the model's dtype (video frames, not latents).

Any Wan 2.1-layout checkpoint mirage.model.wan_checkpoint.load_dit reads (without --checkpoint: random
weights, seed 0). Both activation modes run on the same clip; prints a line each and writes the JSON report.
"""
from __future__ import annotations

import argparse
import sys

import torch

from mirage.bridge.dit_quality import evaluate_dit
from mirage.core.config import get_dit_config
from mirage.core.errors import MirageError
from mirage.core.report import write_json
from mirage.model.dit import WanDiT
from mirage.model.dit_pipeline import torch_device
from mirage.model.fp8 import ACTIVATIONS, fp8_rollout_psnr
from mirage.model.wan_checkpoint import load_dit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="dit-tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--frames", type=int, default=50, help="latent frames of the clip (--restyle: video frames, "
                   "at least one 50-frame window)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restyle", default=None, metavar="CHECKPOINT", help="video-to-video of a DiT trained here")
    p.add_argument("--strength", type=float, default=0.5, help="with --restyle")
    p.add_argument("--json", default="fp8_quality.json")
    args = p.parse_args(argv)
    if args.restyle:
        return restyle(args)
    try:
        cfg, device = get_dit_config(args.config), torch_device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if args.checkpoint:
            model, _ = load_dit(args.checkpoint, cfg, dtype=dtype, device=device)
        else:
            torch.manual_seed(0)
            with torch.device(device):
                model = WanDiT(cfg).to(dtype)
        model = model.eval().requires_grad_(False)
        reports = {a: fp8_rollout_psnr(model, args.frames, a, args.seed) for a in ACTIVATIONS}
    except MirageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for activations, r in reports.items():
        print(f"{cfg.name} FP8 ({activations}) vs {r['reference']} over {r['frames']} latent frames: "
              f"mean {r['psnr_mean_db']:.2f} dB, min {r['psnr_min_db']:.2f} dB, last 10 {r['psnr_last10_db']:.2f} dB")
    write_json(args.json, {"checkpoint": args.checkpoint or "random (seed 0)", "device": str(device),
                           "activations": reports})
    print(f"wrote {args.json}")
    return 0


def restyle(args) -> int:
    """--restyle: the same 500 frames restyled in the model's dtype and with FP8 (static, dynamic), scored
    against the ground truth by the same windows as docs/QUALITY.md."""
    device = str(torch_device(args.device))
    try:
        runs = {fp8 or "model dtype": evaluate_dit(args.restyle, args.frames, strength=args.strength, seed=args.seed,
                                                   device=device, fp8=fp8) for fp8 in (None, *ACTIVATIONS)}
    except MirageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    psnr = {name: sum(w["psnr"] for w in r["windows"]) / len(r["windows"]) for name, r in runs.items()}
    for name, r in runs.items():
        print(f"{name:>12}: PSNR {psnr[name]:.3f} dB against the truth (mean of {len(r['windows'])} windows, "
              f"{r['frames']} frames, strength {r['strength']}), {psnr[name] - psnr['model dtype']:+.3f} dB vs the "
              f"model's dtype, drift {r['drift_db']:+.2f} dB, {r['ms_per_frame']:.2f} ms/frame")
    write_json(args.json, {"checkpoint": args.restyle, "device": device, "runs": runs, "psnr_db": psnr,
                           "delta_db": {k: v - psnr["model dtype"] for k, v in psnr.items()}})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
