"""The DiT trained here beside the U-Net of its size over 500 frames of video-to-video: the same clips
(`detailed`, truth seed 10000), the same windows and metrics (bridge/quality.score_windows), drift =
PSNR of frames 450-500 minus frames 0-50, and CPU milliseconds per frame of each rollout, measured
alternately in this process so that both see the same load (docs/QUALITY.md).

    python scripts/dit_drift.py --json docs/bench/2026-12-06_cpu_dit-tiny-taesd_drift.json
    python scripts/dit_drift.py --unet-report u.json --dit-report d.json --json out.json   # timing only
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mirage.bridge.dit_quality import evaluate_dit
from mirage.bridge.pipeline import load_pipeline
from mirage.bridge.quality import evaluate, reference_clip, v2v_inputs
from mirage.core.config import PipelineOptions
from mirage.core.report import write_json
from mirage.core.schedule import CONTEXT_NOISE
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec
from mirage.model.wan_checkpoint import saved_dit_config
from mirage.train.dit import PROMPT_FILE


def paired_ms(unet_path: str, dit_path: str, frames: int, rounds: int, strength: float, data: str) -> dict:
    """Wall ms per frame of each model's rollout (U-Net: 4 DDIM steps with its codec; DiT: restyle at
    `strength` with its codec), `rounds` x `frames` each, alternating, after one warm-up round."""
    dit_path = Path(dit_path)
    cfg = saved_dit_config(dit_path)
    truth = reference_clip(cfg.width, frames, 10_000, data)
    unet_inputs, n = v2v_inputs(truth), cfg.block_frames
    options = PipelineOptions(dtype="float32", steps=4, context_noise=CONTEXT_NOISE)
    with load_pipeline(unet_path, backend="torch", device="cpu", options=options) as unet, \
            DiTPipeline.open(DiTSpec(cfg.name, checkpoint=dit_path), dit_path / PROMPT_FILE, "cpu") as dit:
        unet.reset(0)
        dit.reset(0)
        dit.set_strength(strength)
        runs = {"unet": lambda: [unet.step(x) for x in unet_inputs],
                "dit": lambda: [dit.restyle(truth[i:i + n]) for i in range(0, frames, n)]}
        times = {name: [] for name in runs}
        for r in range(rounds + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - start) * 1e3 / frames)
    return {"frames": frames, "rounds": rounds, "ms_per_frame": times,
            "median_ms_per_frame": {k: float(np.median(v)) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", default="checkpoints/dit-tiny-taesd")
    parser.add_argument("--unet", default="checkpoints/tiny-128-v2v")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--data", default="detailed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unet-report", default=None, help="A mirage-quality JSON of --unet instead of rolling it here.")
    parser.add_argument("--dit-report", nargs="*", default=None, help="evaluate_dit JSONs instead of rolling them here.")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.unet_report:
        unet = json.loads(Path(args.unet_report).read_text())
    else:
        unet = evaluate(args.unet, frames=args.frames, data=args.data)
    if args.dit_report:
        dits = [json.loads(Path(p).read_text()) for p in args.dit_report]
    else:
        dits = [evaluate_dit(args.dit, args.frames, strength=args.strength, data=args.data, degraded=d)
                for d in (False, True)]
    timing = paired_ms(args.unet, args.dit, 20, 3, args.strength, args.data)
    write_json(args.json, {"threads": args.threads, "device": "cpu", "timing": timing, "unet": unet, "dit": dits})
    for name, r in [("unet", unet)] + [(f"dit {r['task']} s={r['strength']}", r) for r in dits]:
        w0, w1 = r["windows"][0], r["windows"][-1]
        print(f"{name}: psnr {w0['psnr']:.2f} -> {w1['psnr']:.2f} (drift {r['drift_db']:+.2f} dB), "
              f"ssim {w0['ssim']:.3f} -> {w1['ssim']:.3f}")
    print("ms per frame (median of 3 alternating rounds of 20 frames):", timing["median_ms_per_frame"])


if __name__ == "__main__":
    main()
