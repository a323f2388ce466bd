"""`mirage-run`: generate (or transform) a video frame by frame with low latency.

    mirage-run                                  # bundled tiny model, CPU, 48 frames -> mirage.gif
    mirage-run checkpoints/tiny-v2v --input synthetic --frames 500 --output v2v.mp4
    mirage-run CKPT --input clip.mp4 --device cuda --json report.json
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from mirage.runtime.pipeline import BACKENDS, Pipeline, PipelineError
from mirage.core.report import latency_summary, psnr, table, write_json
from mirage.core.video_io import VideoError, iter_frames, write_video

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "checkpoints" / "tiny"


class RunError(click.ClickException):
    """A user error: one line on stderr, exit status 2."""

    exit_code = 2


def _input_stream(source: str, size: int, frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input frame, ground-truth frame) pairs, (H, W, 3) float32, read as they are needed: the
    video-to-video input is the frame's luma plus coarse chroma, so a clip's own colors are its
    ground truth."""
    import torch

    from mirage.train.data import SyntheticVideo, v2v_input

    if source == "synthetic":
        video = SyntheticVideo(size, seed=12345)
        truths = (video.clip(0, 1, start=n)[0] for n in range(frames))
    else:
        truths = (f for _, f in zip(range(frames), iter_frames(source, size)))
    try:
        for truth in truths:
            chw = torch.from_numpy(np.ascontiguousarray(truth.transpose(2, 0, 1)))[None]
            yield v2v_input(chw)[0].permute(1, 2, 0).numpy(), truth
    except VideoError as e:
        raise RunError(str(e)) from e


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path), default=DEFAULT_MODEL)
@click.option("--input", "source", default=None,
              help="Input stream for video-to-video models: a video file, an image folder, a webcam index "
                   "(0 = /dev/video0, Linux) or 'synthetic' (the default for them). Frames are center-cropped "
                   "and resized to the model's size.")
@click.option("--frames", type=click.IntRange(min=1), default=48, help="Frames to generate.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="DDIM steps per frame; default: the model's own (a distilled student records it), else 4.")
@click.option("--seed", type=int, default=0, help="Noise seed: the same seed gives the same video.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("mirage.gif"),
              help="Where to write: .mp4, .gif, or a folder for PNG frames.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              help="auto: TensorRT for an artifact with engines on a GPU, else ONNX Runtime for an artifact, "
                   "PyTorch for a checkpoint.")
@click.option("--no-cuda-graph", is_flag=True, help="Run each frame eagerly instead of replaying a CUDA graph.")
@click.option("--compile", "compile_", is_flag=True,
              help="PyTorch backend: generate the kernels with torch.compile (Inductor) and capture them in the "
                   "frame graph (the fastest PyTorch path on a GPU; compiling takes a minute).")
@click.option("--kernel-library", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PyTorch backend on CUDA: run temporal attention with the fused kernel of this "
                   "libmirage_kernels.so (build it with CMake, see README).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the latency report as JSON here.")
@click.option("--fps", type=click.IntRange(min=1), default=16, help="Frame rate of the written video.")
def main(model, source, frames, steps, seed, output, backend, no_cuda_graph, compile_, kernel_library, device, json_path,
         fps):
    """Generate a video with a Mirage checkpoint or exported artifact, one frame at a time,
    and report per-frame latency. Video-to-video models restore full color to an input stream."""
    from tqdm import tqdm

    try:
        pipe = Pipeline.load(model, backend=backend, device=device, steps=steps, cuda_graph=not no_cuda_graph,
                             compile_mode="default" if compile_ else None, kernel_library=kernel_library)
    except (PipelineError, RuntimeError, ValueError) as e:
        raise RunError(str(e)) from e
    with pipe:
        size = pipe.shapes["x_t"][2]
        if pipe.v2v:
            pairs = _input_stream(source or "synthetic", size, frames)
        elif source is not None:
            raise RunError(f"{model} is a generation model and takes no --input; use a video-to-video model")
        else:
            pairs = ((None, None) for _ in range(frames))
        start = time.perf_counter()
        pipe.reset(seed)  # allocates, warms up and captures on first use
        gpu = pipe.gpu
        if gpu is not None:
            gpu.reset_peak_memory()
        setup = time.perf_counter() - start
        out_frames, times, psnrs = [], [], []
        with tqdm(total=frames, desc="frames", unit="frame") as bar:
            t0 = time.perf_counter()
            for x, truth in pairs:
                frame = pipe.step(x)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                out_frames.append(frame)
                if truth is not None:
                    psnrs.append(float(psnr(frame, truth)))
                bar.set_postfix(ms=f"{times[-1] * 1e3:.1f}")
                bar.update(1)
                t0 = time.perf_counter()
        if not times:
            raise RunError(f"{source}: no frames could be read")
        backend_name = type(pipe.backend).__name__.replace("Backend", "").lower()
        device_name = gpu.device_name() if gpu else "cpu"
        peak, peak_kind = gpu.memory_mb() if gpu else (None, "")
        graphs = bool(pipe.graphs)
    try:
        written = write_video(output, out_frames, fps=fps)
    except VideoError as e:
        raise RunError(str(e)) from e
    report = {"model": str(model), "backend": backend_name, "device": device_name, "cuda_graph": graphs,
              "steps": len(pipe.schedule.timesteps), "seed": seed, "setup_ms": setup * 1e3, **latency_summary(times, times[0]),
              "output": str(output), "written": written, "peak_gpu_mb": peak}
    if psnrs:
        report["psnr_db"] = float(np.mean(psnrs))
    rows = [("output", f"{output} ({written} frames)"),
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


if __name__ == "__main__":
    main()
