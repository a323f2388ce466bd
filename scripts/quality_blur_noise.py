"""Where blur and noise put a video on the sharpness / motion plane: the data's own clips (the
reference of mirage-quality's ratios) blurred by a Gaussian of each sigma, plus independent noise
per frame, scored against the clean clips. It shows which mixes of blur and noise keep
sharpness and motion both within 10% of the data's at one frame size, the test behind issue 18's
missed generation target (docs/QUALITY.md, eighth session).

    python scripts/quality_blur_noise.py                 # 32x32 synthetic clips, as checkpoints/tiny's
    python scripts/quality_blur_noise.py --size 64 --json out.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from mirage.core import metrics as M
from mirage.bridge.quality import DATA_CLIPS, reference_clip

SIGMAS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.2)  # pixels
NOISES = (0.0, 0.01, 0.02, 0.04)  # standard deviation, frames in [-1, 1]


def blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """(T, H, W, C) frames blurred in H and W by a separable Gaussian, edges reflected."""
    if sigma == 0:
        return frames
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * frames.ndim
        pad[axis] = (r, r)
        padded = np.pad(frames, pad, mode="reflect")
        frames = sum(w * np.take(padded, range(i, i + frames.shape[axis]), axis=axis) for i, w in enumerate(k))
    return frames


def at_least(low: int):
    """An argparse type: an integer >= low, else a one-line usage error."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return int(text)
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=at_least(16), default=32, help="frame size in pixels (at least 16)")
    ap.add_argument("--frames", type=at_least(3), default=50, help="frames per clip (at least 3: flicker needs 3)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    clips = [reference_clip(args.size, args.frames, 20_000 + i) for i in range(DATA_CLIPS)]  # mirage-quality's data
    ref = {name: np.mean([fn(c) for c in clips]) for name, fn in
           (("sharpness", M.sharpness), ("motion", M.motion), ("flicker", M.flicker))}
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'sigma':>6} {'noise':>6} {'sharpness':>10} {'motion':>8} {'flicker':>8} {'motion/sharpness':>17}")
    for sigma in SIGMAS:
        for noise in NOISES:
            out = [blur(c, sigma) + noise * rng.standard_normal(c.shape) for c in clips]
            row = {"sigma": sigma, "noise": noise}
            row.update({f"{name}_ratio": float(np.mean([fn(c) for c in out]) / ref[name]) for name, fn in
                        (("sharpness", M.sharpness), ("motion", M.motion), ("flicker", M.flicker))})
            rows.append(row)
            print(f"{sigma:6.1f} {noise:6.2f} {row['sharpness_ratio']:10.2f} {row['motion_ratio']:8.2f} "
                  f"{row['flicker_ratio']:8.2f} {row['motion_ratio'] / row['sharpness_ratio']:17.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "frames": args.frames, "clips": DATA_CLIPS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
