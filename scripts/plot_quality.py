"""Drift curves of several quality reports in one PNG (the metric per window over frame index).

    python scripts/plot_quality.py q-fp32.json:fp32 q-fp16.json:fp16 --metric psnr --out drift.png
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="JSON reports of mirage-quality, each as PATH[:LABEL]")
    p.add_argument("--metric", default="psnr",
                   help="a per-window key: psnr, ssim, sharpness_ratio, motion_ratio, flicker_ratio, feature_distance, ...")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for item in args.reports:
        path, _, label = item.partition(":")
        report = json.loads(open(path).read())
        windows = report["windows"]
        if args.metric not in windows[0]:
            p.error(f"{path} has no per-window {args.metric!r}; it has {', '.join(windows[0])}")
        mid = [(w["start"] + w["end"]) / 2 for w in windows]
        ax.plot(mid, [w[args.metric] for w in windows], marker="o", label=label or path)
    ax.set_xlabel("frame (window centre)")
    ax.set_ylabel(args.metric)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
