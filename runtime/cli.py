"""`mirage-run`: generate (or transform) a video frame by frame with low latency.

    mirage-run                                  # bundled tiny model, CPU, 48 frames -> mirage.gif
    mirage-run checkpoints/tiny-v2v --input synthetic --frames 500 --output v2v.mp4
    mirage-run CKPT --input clip.mp4 --device cuda --json report.json
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from .report import latency_summary, table, write_json

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "checkpoints" / "tiny"


class RunError(click.ClickException):
    """A user error: one line on stderr, exit status 2."""

    exit_code = 2


def _input_stream(source: str, size: int, frames: int):
    """(input frames, ground-truth frames or None) as lists of (1, 3, H, W) tensors."""
    import numpy as np
    import torch

    from mirage.train.data import SyntheticVideo, v2v_input

    from .video_io import VideoError, iter_frames

    if source == "synthetic":
        clip = torch.from_numpy(SyntheticVideo(size, seed=12345).clip(0, frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
        return [v2v_input(f)[None] for f in clip], [f[None] for f in clip]
    try:
        raw = [torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1)))[None]
               for _, f in zip(range(frames), iter_frames(source, size))]
    except VideoError as e:
        raise RunError(str(e)) from e
    # A user's video is restored from its luma + coarse chroma, so its own colors are the ground truth.
    return [v2v_input(f) for f in raw], raw


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path), default=DEFAULT_MODEL)
@click.option("--input", "source", default=None,
              help="Input stream for video-to-video models: a video file, an image folder, or 'synthetic' "
                   "(the default for them). Frames are center-cropped and resized to the model's size.")
@click.option("--frames", type=click.IntRange(min=1), default=48, help="Frames to generate.")
@click.option("--steps", type=click.IntRange(1, 1000), default=4, help="DDIM steps per frame.")
@click.option("--seed", type=int, default=0, help="Noise seed: the same seed gives the same video.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("mirage.gif"),
              help="Where to write: .mp4, .gif, or a folder for PNG frames.")
@click.option("--backend", type=click.Choice(["auto", "torch"]), default="auto",
              help="Inference backend (torch: the PyTorch reference).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the latency report as JSON here.")
@click.option("--fps", type=click.IntRange(min=1), default=16, help="Frame rate of the written video.")
def main(model, source, frames, steps, seed, output, backend, device, json_path, fps):
    """Generate a video with a Mirage checkpoint, one frame at a time, and report per-frame latency."""
    import torch
    from tqdm import tqdm

    from mirage.train.checkpoint import CheckpointError, load_checkpoint
    from mirage.train.rollout import rollout
    from mirage.train.trainer import pick_device

    from .video_io import VideoError, write_video

    try:
        dev = pick_device(device)
        net, meta = load_checkpoint(model, dev)
    except (CheckpointError, RuntimeError) as e:
        raise RunError(str(e)) from e
    cfg = net.cfg
    cond = truth = None
    if cfg.cond_channels:
        cond, truth = _input_stream(source or "synthetic", cfg.image_size, frames)
        frames = min(frames, len(cond))
    elif source is not None:
        raise RunError(f"{model} is a generation model and takes no --input; use a video-to-video checkpoint")

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out_frames, times, psnrs = [], [], []
    start = time.perf_counter()
    stream = rollout(net, frames, steps=steps, seed=seed, cond=cond)
    with tqdm(total=frames, desc="frames", unit="frame") as bar:
        t0 = time.perf_counter()
        for n, frame in enumerate(stream):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            frame = frame.float().cpu()
            out_frames.append(frame[0].permute(1, 2, 0).numpy())
            if truth is not None:
                mse = float(((frame - truth[n]) ** 2).mean())
                psnrs.append(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item())
            bar.set_postfix(ms=f"{times[-1] * 1e3:.1f}")
            bar.update(1)
            t0 = time.perf_counter()
    first = times[0]
    total = time.perf_counter() - start
    try:
        written = write_video(output, out_frames, fps=fps)
    except VideoError as e:
        raise RunError(str(e)) from e
    report = {
        "model": str(model), "config": cfg.name, "task": cfg.task, "backend": "torch", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "steps": steps,
        "seed": seed, **latency_summary(times, first), "total_s": total, "output": str(output), "written": written,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
    if psnrs:
        report["psnr_db"] = sum(psnrs) / len(psnrs)
    rows = [("output", f"{output} ({written} frames)"), ("backend / device", f"{report['backend']} / {report['device_name']}"),
            ("time to first frame", f"{report['first_frame_ms']:.1f} ms"),
            ("per-frame median / p99", f"{report['median_ms']:.2f} / {report['p99_ms']:.2f} ms"),
            ("FPS", f"{report['fps']:.1f}"),
            ("peak GPU memory", f"{report['peak_gpu_mb']:.0f} MiB" if report["peak_gpu_mb"] is not None else "n/a (CPU)")]
    if psnrs:
        rows.append(("PSNR vs. ground truth", f"{report['psnr_db']:.2f} dB"))
    click.echo(table(rows))
    if json_path:
        write_json(json_path, report)


if __name__ == "__main__":
    main()
