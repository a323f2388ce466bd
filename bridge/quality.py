"""Long-rollout quality: does a model hold up over 500+ frames?

    mirage-quality checkpoints/tiny-v2v --frames 500 --json q.json --plot q.png

A checkpoint or an exported artifact rolls out through the runtime `Pipeline` (PyTorch for a
checkpoint, ONNX Runtime for an artifact) on synthetic inputs, and every window of frames is
scored (metrics in mirage.core.metrics):

- video-to-video models against the synthetic ground truth: PSNR, SSIM;
- every model against the data by distribution statistics: colour-histogram distance,
  random-conv feature (Fréchet) distance, sharpness, motion and flicker — each also as a ratio
  to the data's value — and collapsed frames.

The data's statistics come from 20 independent synthetic clips of one window's length; the
`data` entry's distances are those of one such clip to the pool, the scale a window's distance
is read against.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mirage.core import metrics as M
from mirage.core.config import PipelineOptions
from mirage.core.errors import MirageError
from mirage.core.video_io import v2v_input, v2v_input_rgb, write_video
from mirage.core.schedule import CONTEXT_NOISE, default_steps
from mirage.bridge.pipeline import load_pipeline
from mirage.runtime.pipeline import Pipeline
from mirage.train.data import SOURCES, make_source

DATA_CLIPS = 20
RATIOS = ("sharpness", "motion", "flicker")
TABLE_COLUMNS = {"v2v": ["psnr", "ssim"], "generate": []}
STAT_COLUMNS = ["hist_distance", "feature_distance", "sharpness", "sharpness_ratio", "motion", "motion_ratio",
                "flicker", "flicker_ratio", "collapsed"]


class QualityError(MirageError, ValueError):
    """A quality run a user asked for that cannot work (bad sizes); the message says what to change."""


def _meta(path: Path) -> dict:
    for name in ("manifest.json", "config.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    return {}  # load_pipeline names the problem


def reference_clip(size: int, frames: int, seed: int, data: str = "synthetic") -> np.ndarray:
    """(T, H, W, 3) frames in [-1, 1] of a made-on-the-fly source (mirage.train.data.SOURCES)."""
    return make_source(data, size, frames, seed).clip(0, frames)


def v2v_inputs(truth: np.ndarray) -> np.ndarray:
    """The video-to-video input (luma + coarse chroma) of (T, H, W, 3) frames."""
    return np.stack([v2v_input(f) for f in truth])


def open_rollout(model_path: str | Path, steps: int | None = None, context_noise: int = CONTEXT_NOISE,
                 device: str = "cpu", streams: int = 1) -> Pipeline:
    """`model_path` as rollout_frames rolls it out: an artifact on ONNX Runtime, a checkpoint on PyTorch in
    float32, `streams` rows, `steps` per frame (None: the model's own)."""
    path = Path(model_path)
    meta = _meta(path)
    artifact = "graphs" in meta
    options = PipelineOptions(dtype=None if artifact else "float32", steps=steps,
                              context_noise=context_noise, batch=streams)
    return load_pipeline(path, backend="onnxruntime" if artifact else "torch", device=device, options=options)


def rollout_frames(model_path: str | Path, frames: int, steps: int, context_noise: int, seed: int, device: str,
                   truth_seed: int, streams: int = 1, data: str = "synthetic",
                   pipe: Pipeline | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(output frames (S, T, H, W, 3) of `streams` rollouts seeded seed .. seed+S-1, ground-truth
    frames (T, H, W, 3)) and the model's {name, task, size, precision}. Video-to-video models take
    the ground truth's input in every stream; generation models ignore it. `pipe`: the model open already
    (open_rollout with these steps, context noise, device and streams), left open: a caller rolling several
    clips opens it once; reset to `seed`, each clip's frames are those of a pipeline opened for it."""
    meta = _meta(Path(model_path))
    opened = open_rollout(model_path, steps, context_noise, device, streams) if pipe is None else \
        contextlib.nullcontext(pipe)
    with opened as pipe:
        size = pipe.frame_shape[0]
        truth = reference_clip(size, frames, truth_seed, data)
        pipe.reset(seed)  # row b is seeded with seed + b
        if pipe.video_to_video:
            out = [pipe.step_batch(np.repeat(x[None], streams, axis=0)) for x in v2v_inputs(truth)]
        else:
            out = [pipe.step_batch() for _ in range(frames)]
        info = {"name": meta["model"].get("name", "?"), "task": "v2v" if pipe.video_to_video else "generate", "size": size,
                "precision": meta.get("precision", "fp32")}
    return np.stack(out, axis=1), truth, info  # (S, T, H, W, 3)


def data_statistics(size: int, window: int, features: M.RandomConvFeatures, data: str = "synthetic") -> dict:
    """The data's per-window statistics (means over DATA_CLIPS clips) and its reference pool."""
    with _threads() as pool:  # numpy's big array operations release the GIL: clips are scored side by side
        clips = list(pool.map(lambda i: reference_clip(size, window, 20_000 + i, data), range(DATA_CLIPS)))
        hists = list(pool.map(M.colour_histogram, clips))
        feats = list(pool.map(features, clips))
    hist, pool = np.mean(hists, axis=0), M.feature_stats(np.concatenate(feats))
    return {
        "hist": hist, "features": pool,
        "summary": {
            "sharpness": float(np.mean([M.sharpness(c) for c in clips])),
            "motion": float(np.mean([M.motion(c) for c in clips])),
            "flicker": float(np.mean([M.flicker(c) for c in clips])),
            "hist_distance": float(np.mean([M.histogram_distance(h, hist) for h in hists])),
            "feature_distance": float(np.mean([M.frechet_distance(M.feature_stats(f), pool) for f in feats])),
        },
    }


def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(32, os.cpu_count() or 1), thread_name_prefix="mirage-quality")


def window_row(out: np.ndarray, truth: np.ndarray | None, data: dict, features: M.RandomConvFeatures) -> dict:
    """The metrics of one window of frames (and its ground truth, video-to-video)."""
    ref = data["summary"]
    row = {}
    if truth is not None:
        row.update(psnr=float(M.psnr(out, truth).mean()), ssim=float(M.ssim(out, truth).mean()))
    row.update(hist_distance=M.histogram_distance(M.colour_histogram(out), data["hist"]),
               feature_distance=M.frechet_distance(M.feature_stats(features(out)), data["features"]),
               sharpness=M.sharpness(out), motion=M.motion(out), flicker=M.flicker(out),
               collapsed=float(M.collapsed(out).mean()))
    for key in RATIOS:
        row[f"{key}_ratio"] = row[key] / ref[key]
    return row


def evaluate(model_path: str | Path, frames: int = 500, window: int = 50, steps: int | None = None,
             context_noise: int = CONTEXT_NOISE, seed: int = 0, device: str = "cpu", streams: int = 1,
             data: str = "synthetic", examples: str | Path | None = None, pipe: Pipeline | None = None) -> dict:
    """Roll `model_path` out for `frames` frames in `streams` independent streams (seeds seed ..
    seed+streams-1) on clips of `data` and score every window: each metric is the mean over the
    streams, `std` its spread. steps=None uses the model's own step count (a distilled student
    records it), else 4. `examples`: a folder for PNGs of stream 0's first, middle and last frame
    (video-to-video: input | output | ground truth side by side). `pipe`: as rollout_frames takes it."""
    if window < 3 or frames < window:
        raise QualityError(f"--window {window} / --frames {frames}: need 3 <= window <= frames")
    if streams < 1:
        raise QualityError(f"--streams {streams}: need at least 1")
    steps = steps or default_steps(_meta(Path(model_path)))
    if data not in SOURCES:
        raise QualityError(f"--data {data!r}: choose one of {', '.join(SOURCES)}")
    out, truth, info = rollout_frames(model_path, frames, steps, context_noise, seed, device, 10_000 + seed, streams,
                                      data, pipe)
    v2v = info["task"] == "v2v"
    if examples is not None:
        write_examples(examples, out[0], truth if v2v else None)
    windows, reference = score_windows(out, truth if v2v else None, window, data)
    report = {"model": str(model_path), "config": info["name"], "task": info["task"],
              "precision": info["precision"], "frames": frames, "window": window, "steps": steps,
              "context_noise": context_noise, "seed": seed, "streams": streams, "source": data,
              "data": reference["summary"],
              "windows": windows, "collapsed_frames": int(sum(M.collapsed(video).sum() for video in out))}
    if v2v:
        report.update(drift_db=windows[-1]["psnr"] - windows[0]["psnr"], ssim_definition=M.SSIM_DEFINITION)
    return report


def score_windows(out: np.ndarray, truth: np.ndarray | None, window: int, data: str) -> tuple[list[dict], dict]:
    """Every window of `out` (S, T, H, W, 3) scored (against `truth` (T, H, W, 3) when given), each metric
    the mean over the S streams and `std` its spread; and the data's reference statistics."""
    features, reference = _reference(out.shape[2], window, data)
    starts = range(0, out.shape[1] - window + 1, window)
    with _threads() as pool:  # every (window, stream) scored side by side: at 512x512 SSIM alone is ~0.2 s a frame
        scored = list(pool.map(lambda job: window_row(out[job[1], job[0]:job[0] + window],
                                                      None if truth is None else truth[job[0]:job[0] + window],
                                                      reference, features),
                               [(s, b) for s in starts for b in range(len(out))]))  # (window, stream) pairs
    windows = []
    for i, s in enumerate(starts):
        rows = scored[i * len(out):(i + 1) * len(out)]
        windows.append({"start": s, "end": s + window, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
                        "std": {k: float(np.std([r[k] for r in rows])) for k in rows[0]}})
    return windows, reference


@functools.lru_cache(maxsize=4)
def _reference(size: int, window: int, data: str) -> tuple[M.RandomConvFeatures, dict]:
    """The (seeded) feature bank and the data's statistics every rollout of one size, window and data is
    scored against: computed once a process, as a comparison over clips scores several rollouts a clip."""
    features = M.RandomConvFeatures()
    return features, data_statistics(size, window, features, data)


def write_examples(folder: str | Path, video: np.ndarray, truth: np.ndarray | None) -> list[int]:
    """PNGs (folder/00000.png ...) of the first, middle and last frame of `video` (T, H, W, 3); with
    a ground truth, each is input (in RGB) | output | truth. Returns the frame indices."""
    picks = sorted({0, len(video) // 2, len(video) - 1})
    if truth is None:
        strips = [video[i] for i in picks]
    else:
        strips = [np.concatenate([v2v_input_rgb(v2v_input(truth[i])), video[i], truth[i]], axis=1) for i in picks]
    write_video(folder, strips, scale=1)
    return picks


def format_table(report: dict) -> str:
    cols = TABLE_COLUMNS[report["task"]] + STAT_COLUMNS
    lines = [f"{'frames':>9} " + " ".join(f"{c:>16}" for c in cols)]
    lines += [f"{w['start']:>4}-{w['end']:<4} " + " ".join(f"{w[c]:>16.4f}" for c in cols) for w in report["windows"]]
    d = report["data"]
    lines.append(f"data: hist_distance {d['hist_distance']:.4f} and feature_distance {d['feature_distance']:.4f} "
                 f"(one clip vs. the pool of {DATA_CLIPS}), sharpness {d['sharpness']:.4f}, motion {d['motion']:.4f}, "
                 f"flicker {d['flicker']:.4f}")
    streams = report.get("streams", 1)
    if streams > 1:
        lines.insert(0, f"means over {streams} streams (seeds {report['seed']}..{report['seed'] + streams - 1}); "
                        "per-window spread in the JSON's std")
    lines.append(f"collapsed frames: {report['collapsed_frames']} of {report['frames'] * streams}")
    if "drift_db" in report:
        lines.append(f"drift (last window - first window): {report['drift_db']:+.2f} dB")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """A PNG of the per-window metrics over frame index, the data's value dashed (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = TABLE_COLUMNS[report["task"]] + ["hist_distance", "feature_distance", "sharpness", "motion", "flicker"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
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
