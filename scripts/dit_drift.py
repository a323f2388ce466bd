"""The DiT trained here beside the U-Net of its size over 500 frames of video-to-video, on several truth clips:
the `detailed` clips of truth seeds 10000 + seed .. (as `mirage-quality --data detailed --seed`), the same
windows and metrics (bridge/quality.score_windows), drift = PSNR of frames 450-500 minus frames 0-50, each
against the autoencoder's own round trip of the clip (bridge/dit_quality.compare_drift), all in float32; and
milliseconds per frame of each rollout, measured alternately in this process so that both see the same load
(docs/QUALITY.md).

    python scripts/dit_drift.py --clips 8 --device cuda         # JSON: docs/bench/DATE_DEVICE_dit-tiny-taesd_drift_8clips.json
    python scripts/dit_drift.py --json docs/bench/2026-12-06_cpu_dit-tiny-taesd_drift.json     # one clip, seed 0
    python scripts/dit_drift.py --clips 1 --seed 3 --frames 20 --window 5 --json /tmp/d.json   # clip 3 alone
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mirage.bridge.dit_quality import compare_drift, format_drift_table
from mirage.bridge.pipeline import load_pipeline
from mirage.bridge.quality import reference_clip, v2v_inputs
from mirage.core.config import CACHE_FROM, PipelineOptions
from mirage.core.errors import MirageError
from mirage.core.report import device_tag, write_json
from mirage.core.schedule import CONTEXT_NOISE
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec
from mirage.model.wan_checkpoint import saved_dit_config
from mirage.train.dit import PROMPT_FILE


def paired_ms(unet_path: str, dit_path: str, frames: int, rounds: int, strength: float, data: str,
              device: str) -> dict:
    """Wall ms per frame of each model's rollout on `device` in float32 (U-Net: 4 DDIM steps with its codec;
    DiT: restyle at `strength` with its codec), `rounds` x `frames` each, alternating, after one warm-up
    round. Both return every frame to the host, so a GPU's work is done when the clock stops."""
    dit_path = Path(dit_path)
    cfg = saved_dit_config(dit_path)
    truth = reference_clip(cfg.width, frames, 10_000, data)
    unet_inputs, n = v2v_inputs(truth), cfg.block_frames
    options = PipelineOptions(dtype="float32", steps=4, context_noise=CONTEXT_NOISE)
    with load_pipeline(unet_path, backend="torch", device=device, options=options) as unet, \
            DiTPipeline.open(DiTSpec(cfg.name, checkpoint=dit_path), dit_path / PROMPT_FILE, device, graph=False,
                             dtype="float32") as dit:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit", default="checkpoints/dit-tiny-taesd",
                        help="The DiT checkpoint (default: %(default)s).")
    parser.add_argument("--unet", default="checkpoints/tiny-128-v2v",
                        help="The U-Net beside it (default: %(default)s).")
    parser.add_argument("--clips", type=int, default=1, help="Truth clips, seeds --seed .. --seed + clips - 1.")
    parser.add_argument("--seed", type=int, default=0, help="The first clip's seed (default: %(default)s).")
    parser.add_argument("--frames", type=int, default=500, help="Frames a rollout makes (default: %(default)s).")
    parser.add_argument("--window", type=int, default=50, help="Frames a scored window holds (default: %(default)s).")
    parser.add_argument("--strength", type=float, default=0.5,
                        help="The DiT's video-to-video strength (default: %(default)s).")
    parser.add_argument("--cache-from", choices=CACHE_FROM, default="output",
                        help="What the DiT's blocks leave in its KV cache (default: %(default)s; mirage-run --cache-from).")
    parser.add_argument("--data", default="detailed",
                        help="The truth clips' kind, as mirage-quality --data (default: %(default)s).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (float32 either way).")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch.")
    parser.add_argument("--rounds", type=int, default=3, help="Timing rounds of 20 frames per model (0: no timing).")
    parser.add_argument("--json", default=None, help="Default: docs/bench/DATE_DEVICE_DIT_drift_Kclips.json.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # float32 means float32 on a GPU too: cuDNN's convolutions (the autoencoder's, the U-Net's) default to TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    try:
        report = compare_drift(args.unet, args.dit, args.clips, args.seed, args.frames, args.window, args.strength,
                               args.data, args.device, args.cache_from)
        timing = paired_ms(args.unet, args.dit, 20, args.rounds, args.strength, args.data, args.device) \
            if args.rounds else None
    except MirageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    path = args.json or (f"docs/bench/{datetime.date.today()}_{device_tag(device)}_{Path(args.dit).name}"
                         f"_drift_{args.clips}clips{'_cache-input' if args.cache_from == 'input' else ''}.json")
    write_json(path, {"threads": args.threads, "device": device, "precision": "float32",
                      "seconds": time.perf_counter() - start, "timing": timing, **report})
    print(format_drift_table(report["summary"]))
    if timing:
        print(f"ms per frame (median of {args.rounds} alternating rounds of 20 frames):", timing["median_ms_per_frame"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
