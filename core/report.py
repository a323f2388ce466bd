"""Latency statistics and the closing table printed by `mirage-run` and the benchmarks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def latency_summary(frame_seconds: list[float], first_frame_seconds: float | None = None) -> dict:
    """Median / p99 / mean per-frame latency in ms and FPS, over frames after the first."""
    steady = np.asarray(frame_seconds[1:] if len(frame_seconds) > 1 else frame_seconds, dtype=np.float64) * 1e3
    out = {
        "frames": len(frame_seconds),
        "median_ms": float(np.median(steady)),
        "p99_ms": float(np.percentile(steady, 99)),
        "mean_ms": float(steady.mean()),
        "fps": float(1e3 / steady.mean()),
    }
    if first_frame_seconds is not None:
        out["first_frame_ms"] = first_frame_seconds * 1e3
    return out


def psnr(a, b) -> np.ndarray:
    """Per-frame PSNR in dB of frames in [-1, 1] (peak-to-peak 2), averaged over the last three
    axes: (..., H, W, C) or (..., C, H, W) arrays, numpy or torch (CPU)."""
    err = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2
    return 10 * np.log10(4.0 / np.maximum(err.mean(axis=(-3, -2, -1)), 1e-12))


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def device_tag(device: str) -> str:
    """A report file name's device word: "cpu", or the GPU's model ("NVIDIA H100 80GB HBM3" -> "h100")."""
    return "cpu" if device == "cpu" else device.split()[1].lower()


def write_json(path: str | Path, report: dict) -> None:
    """Written to a hidden sibling and renamed, so a report already at `path` is replaced whole or
    not at all."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
