"""`mirage-quality`: score a checkpoint or artifact over a long rollout, window by window.

    mirage-quality checkpoints/tiny --frames 500 --json q.json --plot q.png
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from mirage.cli.errors import UserError
from mirage.cli.options import SEED, device as device_name
from mirage.core.errors import MirageError
from mirage.core.schedule import CONTEXT_NOISE
from mirage.core.video_io import check_frames_folder


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--frames", type=click.IntRange(min=3), default=500, help="Frames to roll out.")
@click.option("--window", type=click.IntRange(min=3), default=50, help="Frames per scored window.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="DDIM steps per frame; default: the model's own (a distilled student records it), else 4.")
@click.option("--context-noise", type=click.IntRange(0, 999), default=CONTEXT_NOISE, help="Inference context noise t_ctx.")
@click.option("--seed", type=SEED, default=0, help="Noise seed of the (first) rollout.")
@click.option("--streams", type=click.IntRange(min=1), default=1,
              help="Independent rollouts (seeds SEED, SEED+1, ...) run together as a batch; every metric is their "
                   "mean. One generated video is one sample: use 8 or more to compare generation models.")
@click.option("--data", type=click.Choice(["synthetic", "detailed", "photos"]), default="synthetic",
              help="Clips the rollout is scored on (and, video-to-video, takes its input from): the shapes video, "
                   "the camera-like detailed video, or pans over scikit-image's photographs.")
@click.option("--examples", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for PNGs of the first, middle and last frame (video-to-video: input | output | truth).")
@click.option("--device", default="cpu", callback=device_name,
              help="cpu, cuda or cuda:N for a checkpoint; an artifact runs with ONNX Runtime on the CPU (cpu only).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of the metrics over frame index here (needs matplotlib).")
def main(model, frames, window, steps, context_noise, seed, streams, data, examples, device, json_path, plot_path):
    """Roll MODEL (checkpoint folder, or artifact folder of mirage-export) out and print, per
    window, PSNR/SSIM against ground truth (video-to-video) and distribution statistics against
    the data: histogram and feature distances, sharpness, motion, flicker (and their ratios to
    the data's), collapsed frames. Definitions: docs/QUALITY.md."""
    from mirage.core.report import write_json
    from mirage.bridge.quality import evaluate, format_table, plot

    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or leave --plot out)")
    try:  # made now, so a folder that cannot be made fails before the rollout, not after it
        if examples is not None:
            examples.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--examples {examples}: cannot make this folder ({e.strerror})") from e
    try:
        if examples is not None:  # what the examples' writer would refuse after the rollout (someone's files)
            check_frames_folder(examples)
        report = evaluate(model, frames, window, steps, context_noise, seed, device, streams, data, examples)
    except MirageError as e:
        raise UserError(str(e)) from e
    click.echo(format_table(report))
    if json_path:
        write_json(json_path, report)
    if plot_path:
        plot(report, plot_path)


if __name__ == "__main__":
    main()
