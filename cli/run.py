"""`mirage-run`: generate (or transform) a video frame by frame with low latency.

    mirage-run                                  # bundled 256x256 video-to-video model, CPU, 48 frames -> mirage.gif
    mirage-run checkpoints/tiny-v2v --input synthetic --frames 500 --output v2v.mp4
    mirage-run CKPT --input clip.mp4 --device cuda --fast --json report.json
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from mirage.cli import options as shared
from mirage.cli.errors import UserError
from mirage.core.config import PipelineOptions
from mirage.core.errors import MirageError
from mirage.core.report import latency_summary, psnr, table, write_json
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import (MIN_INPUT_SIDE, VideoError, VideoWriter, check_not_input, check_source, input_size,
                                  iter_frames, to_float, v2v_input)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# the default demo: 48 frames of 256x256 video-to-video took 32 s on this workplace's 2-core CPU, most of it the
# autoencoder, whose cost grows with the pixels (512x512: 4x the pixels), so 256x256 is what fits the demo's minute
DEFAULT_MODEL = PACKAGE_ROOT / "checkpoints" / "tiny-256-v2v"


def _check_source(source: str | None) -> str | None:
    """--input is checked before the model loads: a missing file fails at once, not after setup."""
    if source is not None and source != "synthetic":
        try:
            check_source(source)
        except VideoError as e:
            raise click.BadParameter(str(e), param_hint="'--input'") from e
    return source


def _input_stream(source: str, size: int, frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input frame, ground-truth frame) pairs, (H, W, 3) float32, read as they are needed: the
    video-to-video input is the frame's luma plus coarse chroma, so a clip's own colors are its
    ground truth."""
    if source == "synthetic":
        video = SyntheticVideo(size, seed=12345)
        truths = (video.clip(0, 1, start=n)[0] for n in range(frames))
    else:
        truths = (f for _, f in zip(range(frames), iter_frames(source, size)))
    for truth in truths:
        yield v2v_input(truth), truth


class _Stop:
    """Ctrl-C / SIGTERM end the run after the frame in progress; the output keeps the frames made."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path), default=DEFAULT_MODEL)
@click.option("--input", "source", default=None, callback=lambda ctx, param, value: _check_source(value),
              help="Input stream for video-to-video models: a video file, an image folder, a webcam index "
                   "(0 = /dev/video0, Linux) or 'synthetic' (the default for them). Frames are center-cropped "
                   f"and resized to the model's size; frames under {MIN_INPUT_SIDE} pixels on a side are refused, "
                   "smaller ones than the model's are enlarged with a warning. Never the --output path.")
@click.option("--frames", type=click.IntRange(min=1), default=48, help="Frames to generate.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="DDIM steps per frame; default: the model's own (a distilled student records it), else 4.")
@click.option("--seed", type=shared.SEED, default=0, help="Noise seed: the same seed gives the same video on every backend.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("mirage.gif"),
              help="Where to write: .mp4, .gif, or a folder name (no suffix) for PNG frames. Written as frames "
                   "arrive; Ctrl-C keeps the frames made so far. A video file replaces one already there only "
                   "when the run has made a frame.")
@shared.backend
@shared.fast
@click.option("--no-cuda-graph", is_flag=True, help="Run each frame eagerly instead of replaying a CUDA graph.")
@click.option("--compile", "compile_", is_flag=True,
              help="PyTorch backend (checkpoints; refused for artifacts): Inductor kernels (torch.compile) captured "
                   "in the frame graph, without the rest of --fast.")
@click.option("--kernel-library", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PyTorch backend on CUDA: run temporal attention with the fused kernel of this "
                   "libmirage_kernels.so (build it with CMake, see README).")
@click.option("--device", default="auto", callback=shared.device,
              help="auto, cpu, cuda or cuda:N. An artifact without engines runs on the CPU (ONNX Runtime): cpu or auto.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the latency report as JSON here.")
@click.option("--fps", type=click.IntRange(min=1), default=16, help="Frame rate of the written video.")
def main(model, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_, kernel_library, device,
         json_path, fps):
    """Generate a video with a Mirage checkpoint or exported artifact, one frame at a time,
    and report per-frame latency. Video-to-video models restore full color to an input stream.

    MODEL defaults to the bundled checkpoints/tiny-256-v2v: 256x256 frames restored from the
    synthetic input, on a CPU in under a minute (checkpoints/tiny-128-v2v: 128x128, 4x faster;
    checkpoints/tiny generates, with no input, at 32x32)."""
    try:
        _run(model, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_, kernel_library,
             device, json_path, fps)
    except MirageError as e:
        raise UserError(str(e)) from e


def _run(model, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_, kernel_library, device,
         json_path, fps):
    from tqdm import tqdm

    from mirage.bridge.pipeline import load_pipeline

    if json_path is not None and not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    shared.check_fast(fast, device)
    for written in filter(None, (output, json_path)):
        check_not_input(written, source)
    shape_in = input_size(source) if source not in (None, "synthetic") else None
    # the video is written as bytes: the frame graph makes them, and only they cross PCIe
    common = dict(steps=steps, cuda_graph=not no_cuda_graph, kernel_library=kernel_library, frames="uint8")
    options = PipelineOptions.fastest(**common) if fast else \
        PipelineOptions(compile="default" if compile_ else None, **common)
    writer = VideoWriter(output, fps=fps)  # the path and format are checked before any frame is made
    pipe = load_pipeline(model, backend=backend, device=device, options=options)
    with pipe, writer, _Stop() as stop:
        size = pipe.frame_shape[0]
        if pipe.video_to_video and shape_in and min(shape_in) < size:
            click.echo(f"warning: {source} is {shape_in[0]}x{shape_in[1]}; its center square is enlarged to the "
                       f"model's {size}x{size}", err=True)
        if pipe.video_to_video:
            pairs = _input_stream(source or "synthetic", size, frames)
        elif source is not None:
            raise UserError(f"{model} is a generation model and takes no --input; use a video-to-video model")
        else:
            pairs = ((None, None) for _ in range(frames))
        start = time.perf_counter()
        pipe.reset(seed)  # allocates, warms up and captures on first use
        setup = time.perf_counter() - start
        times, psnrs = [], []
        with tqdm(total=frames, desc="frames", unit="frame") as bar:
            t0 = time.perf_counter()
            for x, truth in pairs:
                frame = pipe.step(x)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                writer.write(frame)
                if truth is not None:
                    psnrs.append(float(psnr(to_float(frame), truth)))  # of the frame as written
                bar.set_postfix(ms=f"{times[-1] * 1e3:.1f}")
                bar.update(1)
                if stop.signal is not None:
                    break
                t0 = time.perf_counter()
        if not times:
            raise UserError(f"{source}: no frames could be read")
        backend_name = type(pipe.backend).__name__.replace("Backend", "").lower()
        device_name, peak, peak_kind = pipe.describe()
        graphs = bool(pipe.graphs)
    if stop.signal is not None:
        click.echo(f"interrupted ({signal.Signals(stop.signal).name}) after {len(times)} of {frames} frames; "
                   f"{output} holds them", err=True)
    report = {"model": str(model), "backend": backend_name, "device": device_name, "cuda_graph": graphs,
              "options": options.__dict__, "steps": len(pipe.schedule.timesteps), "seed": seed, "setup_ms": setup * 1e3,
              **latency_summary(times, times[0]), "output": str(output), "written": writer.count,
              "peak_gpu_mb": peak, "interrupted": stop.signal is not None}
    if psnrs:
        report["psnr_db"] = float(np.mean(psnrs))
    rows = [("output", f"{output} ({writer.count} frames)"),
            ("backend / device", f"{backend_name} / {device_name}{' (CUDA graph)' if graphs else ''}"),
            ("time to first frame", f"{report['first_frame_ms']:.1f} ms (+ {report['setup_ms']:.0f} ms setup)"),
            ("per-frame median / p99", f"{report['median_ms']:.2f} / {report['p99_ms']:.2f} ms"),
            ("FPS", f"{report['fps']:.1f}"),
            ("GPU memory", f"{peak:.0f} MiB ({peak_kind})" if peak is not None else "n/a (CPU)")]
    if psnrs:
        rows.append(("PSNR vs. ground truth", f"{report['psnr_db']:.2f} dB"))
    click.echo(table(rows))
    if json_path:
        write_json(json_path, report)
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)


if __name__ == "__main__":
    main()
