"""The DiT trained here beside the U-Net of its size over 500 frames of video-to-video: the same clips
(`detailed`, truth seed 10000), the same windows and metrics (bridge/quality.score_windows), drift =
PSNR of frames 450-500 minus frames 0-50, and CPU milliseconds per frame of each rollout measured in
this process, one after the other (docs/QUALITY.md).

    python scripts/dit_drift.py --json docs/bench/2026-12-06_cpu_dit-tiny-taesd_drift.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mirage.bridge.dit_quality import evaluate_dit
from mirage.bridge.pipeline import load_pipeline
from mirage.bridge.quality import evaluate, reference_clip, v2v_inputs
from mirage.core.config import PipelineOptions
from mirage.core.schedule import CONTEXT_NOISE


def unet_ms_per_frame(path: str, frames: int, data: str) -> float:
    """Wall ms per frame of the U-Net's rollout alone (after 5 warm-up frames), as evaluate runs it."""
    inputs = v2v_inputs(reference_clip(128, frames + 5, 10_000, data))
    options = PipelineOptions(dtype="float32", steps=4, context_noise=CONTEXT_NOISE)
    with load_pipeline(path, backend="torch", device="cpu", options=options) as pipe:
        pipe.reset(0)
        for x in inputs[:5]:
            pipe.step(x)
        start = time.perf_counter()
        for x in inputs[5:]:
            pipe.step(x)
        return (time.perf_counter() - start) * 1e3 / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", default="checkpoints/dit-tiny-taesd")
    parser.add_argument("--unet", default="checkpoints/tiny-128-v2v")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5])
    parser.add_argument("--data", default="detailed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unet-report", default=None,
                        help="A mirage-quality JSON of --unet on the same --frames and --data, instead of rolling it here.")
    parser.add_argument("--degraded", action="store_true", help="Also give the DiT the U-Net's input (luma + coarse chroma).")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.unet_report:
        with open(args.unet_report) as f:
            unet = json.load(f)
    else:
        unet = evaluate(args.unet, frames=args.frames, data=args.data)
    unet["ms_per_frame"] = unet_ms_per_frame(args.unet, 50, args.data)
    dits = [evaluate_dit(args.dit, args.frames, strength=s, data=args.data, degraded=degraded)
            for degraded in ([False, True] if args.degraded else [False]) for s in args.strengths]
    with open(args.json, "w") as f:
        json.dump({"threads": args.threads, "device": "cpu", "unet": unet, "dit": dits}, f, indent=1)
    for name, r in [("unet", unet)] + [(f"dit {r['task']} s={r['strength']}", r) for r in dits]:
        w0, w1 = r["windows"][0], r["windows"][-1]
        print(f"{name}: psnr {w0['psnr']:.2f} -> {w1['psnr']:.2f} (drift {r['drift_db']:+.2f} dB), "
              f"ssim {w0['ssim']:.3f} -> {w1['ssim']:.3f}, {r['ms_per_frame']:.1f} ms/frame")


if __name__ == "__main__":
    main()
