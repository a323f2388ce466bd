"""Long-rollout quality: does a model hold up over 500+ frames?

    python scripts/quality.py checkpoints/tiny-v2v --frames 500 --json q.json --plot q.png

Video-to-video models are scored against the synthetic ground truth (PSNR, SSIM) per window
of frames. Generation models have no ground truth frame by frame; their windows are compared
with real synthetic clips by distribution statistics: color histogram distance, sharpness,
frame-to-frame change, and a collapse detector (frames stuck on one color).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mirage.train.checkpoint import load_checkpoint
from mirage.train.data import SyntheticVideo, v2v_input
from mirage.core.report import psnr
from mirage.train.rollout import DEFAULT_CONTEXT_NOISE, DEFAULT_STEPS, rollout

COLLAPSE_STD = 0.03  # a frame whose pixels vary less than this (in [-1, 1] units) is one flat color


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM (Gaussian window 11, sigma 1.5) of (T, 3, H, W) frames in [-1, 1]."""
    a, b = (a + 1) / 2, (b + 1) / 2
    g = torch.exp(-((torch.arange(11, dtype=a.dtype) - 5) ** 2) / (2 * 1.5 ** 2))
    g = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(x):
        return F.conv2d(x, g, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def frame_stats(frames: torch.Tensor, bins: int = 16) -> dict:
    """Distribution statistics of (T, 3, H, W) frames in [-1, 1]."""
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=frames.dtype).expand(3, 1, 3, 3)
    hist = torch.stack([torch.histc(frames[:, c], bins=bins, min=-1, max=1) for c in range(3)])
    return {
        "hist": (hist / hist.sum(dim=1, keepdim=True)).numpy(),
        "sharpness": float(F.conv2d(frames, lap, groups=3).abs().mean()),
        "motion": float((frames[1:] - frames[:-1]).abs().mean()) if len(frames) > 1 else 0.0,
        "collapsed": float((frames.flatten(1).std(dim=1) < COLLAPSE_STD).float().mean()),
    }


def reference_clips(size: int, frames: int, seed: int) -> torch.Tensor:
    clip = SyntheticVideo(size, seed=seed).clip(0, frames)
    return torch.from_numpy(clip).permute(0, 3, 1, 2)  # (T, 3, H, W)


def rollout_frames(model_path: str | Path, frames: int, steps: int, context_noise: int, seed: int, device: str,
                   truth_seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(output frames, ground-truth frames) (T, 3, H, W) and the model's {name, task, size}: a
    checkpoint rolls out in PyTorch, an artifact (manifest.json) through the runtime with ONNX
    Runtime, on the same synthetic inputs."""
    path = Path(model_path)
    if (path / "manifest.json").is_file():
        from mirage.runtime import Pipeline

        manifest = json.loads((path / "manifest.json").read_text())
        with Pipeline.load(path, backend="onnxruntime", steps=steps, context_noise=context_noise) as pipe:
            size = pipe.shapes["x_t"][2]
            truth = reference_clips(size, frames, seed=truth_seed)
            inputs = ([v2v_input(f[None])[0].permute(1, 2, 0).numpy() for f in truth] if pipe.v2v else frames)
            pipe.reset(seed)
            out = torch.from_numpy(np.stack(list(pipe.stream(inputs)))).permute(0, 3, 1, 2)
            info = {"name": manifest["model"].get("name", "?"), "task": "v2v" if pipe.v2v else "generate",
                    "size": size, "precision": manifest.get("precision")}
        return out, truth, info
    model, _ = load_checkpoint(model_path, device)
    cfg = model.cfg
    truth = reference_clips(cfg.image_size, frames, seed=truth_seed)
    cond = (v2v_input(f)[None] for f in truth) if cfg.cond_channels else None
    out = torch.cat([f.float().cpu() for f in rollout(model, frames, steps=steps, seed=seed, cond=cond,
                                                      context_noise=context_noise)])
    return out, truth, {"name": cfg.name, "task": cfg.task, "size": cfg.image_size, "precision": "fp32"}


def evaluate(model_path: str | Path, frames: int = 500, window: int = 50, steps: int = DEFAULT_STEPS,
             context_noise: int = DEFAULT_CONTEXT_NOISE, seed: int = 0, device: str = "cpu") -> dict:
    out, truth, info = rollout_frames(model_path, frames, steps, context_noise, seed, device, 10_000 + seed)
    v2v = info["task"] == "v2v"
    windows = []
    # The data's own statistics, over 20 independent clips (a generated video is not one of them).
    clips = [frame_stats(reference_clips(info["size"], window, seed=20_000 + i)) for i in range(20)]
    ref = {k: np.mean([c[k] for c in clips], axis=0) for k in clips[0]}
    for start in range(0, frames - window + 1, window):
        w, t = out[start:start + window], truth[start:start + window]
        row = {"start": start, "end": start + window}
        if v2v:
            row.update(psnr=float(psnr(w, t).mean()), ssim=float(ssim(w, t).mean()))
        stats = frame_stats(w)
        row.update(hist_distance=float(0.5 * np.abs(stats["hist"] - ref["hist"]).sum(axis=1).mean()),
                   sharpness=stats["sharpness"], motion=stats["motion"], collapsed=stats["collapsed"])
        windows.append(row)
    report = {"model": str(model_path), "config": info["name"], "task": info["task"],
              "precision": info["precision"], "frames": frames, "window": window,
              "steps": steps, "context_noise": context_noise, "seed": seed,
              "data": {"sharpness": float(ref["sharpness"]), "motion": float(ref["motion"]),
                       "hist_distance": float(np.mean([0.5 * np.abs(c["hist"] - ref["hist"]).sum(axis=1).mean()
                                                       for c in clips]))}, "windows": windows}
    if v2v:
        report["drift_db"] = windows[-1]["psnr"] - windows[0]["psnr"]
    return report


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["psnr", "ssim"] if report["task"] == "v2v" else ["hist_distance", "sharpness", "motion"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    mid = [(w["start"] + w["end"]) / 2 for w in report["windows"]]
    for ax, key in zip(np.atleast_1d(axes), keys):
        ax.plot(mid, [w[key] for w in report["windows"]], marker="o")
        if key in report["data"]:
            ax.axhline(report["data"][key], color="gray", linestyle="--", label="data")
            ax.legend()
        ax.set_xlabel("frame")
        ax.set_title(key)
    fig.suptitle(f"{report['config']} {report['task']}: {report['frames']} frames, {report['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder, or an artifact folder of mirage-export (run with ONNX Runtime)")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--context-noise", type=int, default=DEFAULT_CONTEXT_NOISE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG of the metrics over frame index here (needs matplotlib)")
    args = p.parse_args(argv)
    if args.frames < args.window:
        p.error("--frames must be at least --window")
    torch.manual_seed(0)
    report = evaluate(args.model, args.frames, args.window, args.steps, args.context_noise, args.seed, args.device)
    cols = ["psnr", "ssim"] if report["task"] == "v2v" else []
    cols += ["hist_distance", "sharpness", "motion", "collapsed"]
    print(f"{'frames':>9} " + " ".join(f"{c:>13}" for c in cols))
    for w in report["windows"]:
        print(f"{w['start']:>4}-{w['end']:<4} " + " ".join(f"{w[c]:>13.4f}" for c in cols))
    data = report["data"]
    print(f"data: hist_distance {data['hist_distance']:.4f} (one clip vs. the mean of 20), "
          f"sharpness {data['sharpness']:.4f}, motion {data['motion']:.4f}")
    if "drift_db" in report:
        print(f"drift (last window - first window): {report['drift_db']:+.2f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
