"""`mirage-run`: generate (or transform) a video frame by frame with low latency.

    mirage-run                                  # bundled 256x256 video-to-video model, CPU, 48 frames -> mirage.gif
    mirage-run checkpoints/tiny-v2v --input synthetic --frames 500 --output v2v.mp4
    mirage-run CKPT --input clip.mp4 --device cuda --fast --json report.json
    mirage-run self_forcing_dmd.pt --dit wan-1.3b --prompt-embeds cat.safetensors --decoder taew2_1.pth --output cat.mp4
    mirage-run --dit dit-tiny --random-weights --prompt-embeds x.safetensors --frames 24 --output dit.gif  # CPU smoke
    mirage-run artifacts/dit-tiny --prompt-embeds x.safetensors --frames 24 --output dit.gif  # a DiT artifact
    mirage-run artifacts/dit-tiny-taesd --input clip.mp4 --strength 0.5 --prompt-embeds p.safetensors  # its v2v
    mirage-run checkpoints/dit-tiny-taesd --dit dit-tiny-taesd --input clip.mp4 --strength 0.5 \
        --prompt-embeds checkpoints/dit-tiny-taesd/prompt.safetensors --output restyled.mp4  # video-to-video

A Wan 2.1 DiT (--dit CONFIG) generates blocks of latent frames against a rolling KV cache
(mirage.model.dit_pipeline); each block's video frames go to the output as soon as it is decoded.
With --input (a config on a per-frame autoencoder, or a TAEHV --decoder with its encoder),
each input block is encoded, noised to --strength and denoised through the steps left, with the cache and
the prompt: video-to-video.
A DiT artifact (mirage-export --dit) runs in the runtime like any artifact, without --dit: each step is a
block, whose frames go out as it finishes: decoded by its per-frame autoencoder's graph, or without one
(wan-1.3b) the latents' preview. With --input an artifact with the encoder graph runs video-to-video at
--strength (by default DEFAULT_STRENGTH), as --dit --input does; --strength without --input is refused by both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from mirage.cli import options as shared
from mirage.cli.errors import UserError
from mirage.core import graphs as G
from mirage.core.config import DEFAULT_STRENGTH, ModelConfig, PipelineOptions, from_json
from mirage.core.errors import MirageError
from mirage.core.loop import DEFAULT_VIDEO_RATE
from mirage.core.prompts import read_embeddings
from mirage.core.report import latency_summary, psnr, table, write_json
from mirage.core.video_io import (MIN_INPUT_SIDE, VideoError, VideoWriter, center_crop, check_not_input, check_source,
                                  input_size, same_path, to_float)
from mirage.engine.manifest import read_manifest
from mirage.runtime.pipelined import restyle_inputs, run_pipelined, source_frames, v2v_inputs

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


def _resolution(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    width, x, height = value.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise click.BadParameter(f"{value!r}: give WIDTHxHEIGHT, e.g. 832x480")
    return int(width), int(height)


# --dit's own options, collected into one `dit` argument; refused without --dit
dit_options = shared.group(
    "dit",
    shared.dit,
    click.option("--random-weights", is_flag=True,
                 help="--dit without a checkpoint: random weights (and a random TAEHV, encoder and decoder, "
                      "without --decoder)."),
    shared.lora, shared.prompt, shared.prompt_embeds, shared.text_encoder,
    click.option("--decoder", type=click.Path(path_type=Path), default=None,
                 help="--dit: a TAEHV file (taew2_1.pth; its encoder also encodes --input) or a Wan VAE folder "
                      "(diffusers AutoencoderKLWan). Needed to write video, except with --random-weights."),
    click.option("--blocks", type=click.IntRange(min=1), default=None,
                 help="--dit: blocks to generate (instead of --frames, which is rounded up to whole blocks)."),
    click.option("--resolution", callback=_resolution, default=None,
                 help="--dit: WIDTHxHEIGHT video pixels instead of the config's (a multiple of 16)."),
    click.option("--window", type=click.IntRange(min=1), default=None,
                 help="--dit: latent frames a block attends to, itself and the sink included: the KV cache's size "
                      "(Self-Forcing: 21, LongLive: 12)."),
    click.option("--sink", type=click.IntRange(min=0), default=None,
                 help="--dit: first latent frames kept in the cache for good (LongLive's attention sink: 3)."),
    click.option("--fp8", type=click.Choice(["static", "dynamic"]), default=None,
                 help="--dit: FP8 E4M3 matmuls in the blocks' attention and FFN (Hopper/Ada): activation scales "
                      "per tensor, calibrated on a clip with the run's prompt (static), or per token (dynamic). "
                      "On the CPU it runs, slower than float32, to show FP8's error (a note says so)."),
    shared.strength, shared.cache_from)

# torch's CPU _scaled_mm rounds to E4M3 and multiplies without FP8 hardware: a 512x1024x1024 matmul took 41 ms
# against float32's 29 ms on this workplace's CPU
FP8_ON_CPU = ("note: --fp8 on the CPU runs torch's FP8 matmul without FP8 hardware: it shows FP8's error, not its "
              "speed, and is slower than float32; FP8 is fast only on Hopper / Ada / Blackwell GPUs")
PROMPT_OPTIONS = ("prompt", "prompt_embeds", "text_encoder")  # a DiT artifact takes them without --dit
# and a strength and what the cache holds (video-to-video, with an encoder graph)
ARTIFACT_OPTIONS = PROMPT_OPTIONS + ("strength", "cache_from")


class _Stop:
    """Ctrl-C / SIGTERM / SIGHUP (a closed terminal or ssh session) end the run after the frame in
    progress; the output keeps the frames made."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--input", "source", default=None, callback=lambda ctx, param, value: _check_source(value),
              help="Input stream for video-to-video models: a video file, an image folder, a webcam index "
                   "(0 = /dev/video0, Linux) or 'synthetic' (the default for them). Frames are scaled to cover "
                   f"the model's size and center-cropped to it; frames under {MIN_INPUT_SIDE} pixels on a side are "
                   "refused, smaller ones than the model's are enlarged with a warning. Never the --output path.")
@click.option("--frames", type=click.IntRange(min=1), default=48, help="Frames to generate.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="DDIM steps per frame; default: the model's own (a distilled student records it), else 4.")
@click.option("--seed", type=shared.SEED, default=0,
              help="Noise seed: the runtime draws the noise, so the same seed gives the same video on every backend "
                   "it runs (an artifact on TensorRT or ONNX Runtime, a U-Net checkpoint on PyTorch). A --dit "
                   "checkpoint runs outside it and draws its noise in PyTorch: its video differs from its "
                   "artifact's.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("mirage.gif"),
              help="Where to write: .mp4, .gif, or a folder name (no suffix) for PNG frames. Written as frames "
                   "arrive; Ctrl-C keeps the frames made so far. An output already there is replaced whole, only "
                   "when the run has made a frame (a folder: only an empty one or an earlier run's). A run that "
                   "fails midway (a broken input frame) keeps its frames as NAME.partial.mp4 / NAME.partial.")
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
@click.option("--fps", type=click.IntRange(min=1), default=DEFAULT_VIDEO_RATE, help="Frame rate of the written video.")
@dit_options
def main(model, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_, kernel_library, device,
         json_path, fps, dit):
    """Generate a video with a Mirage checkpoint or exported artifact, one frame at a time,
    and report per-frame latency. Video-to-video models restore full color to an input stream.

    MODEL defaults to the bundled checkpoints/tiny-256-v2v: 256x256 frames restored from the
    synthetic input, on a CPU in under a minute (checkpoints/tiny-128-v2v: 128x128, 4x faster;
    checkpoints/tiny generates, with no input, at 32x32).

    With --dit CONFIG, MODEL is a Wan 2.1 DiT checkpoint (README: "Bring your own Wan checkpoint")."""
    try:
        if dit["config"] is None:
            given = [f"--{name.replace('_', '-')}" for name, value in dit.items()
                     if value not in (None, False) and name not in ARTIFACT_OPTIONS]
            if given:
                raise UserError(f"{', '.join(given)}: options of a DiT run; add --dit CONFIG")
            if model is not None and model.is_file():
                raise UserError(f"{model}: a file; Mirage models and artifacts are folders (for a Wan 2.1 DiT "
                                f"checkpoint add --dit CONFIG)")
            if dit["strength"] is not None:
                _check_takes_strength(model or DEFAULT_MODEL, source)
        for flag in ("strength", "cache_from"):
            if dit[flag] is not None and source is None:
                raise UserError(f"--{flag.replace('_', '-')}: video-to-video needs an --input")
        if dit["config"] is None:
            strength = _artifact_strength(model or DEFAULT_MODEL, source, dit["strength"])
            if dit["cache_from"] is not None and strength is None:
                raise UserError(f"--cache-from: a DiT's video-to-video option; {model or DEFAULT_MODEL} is not a DiT "
                                "artifact with an encoder graph")
            _run(model or DEFAULT_MODEL, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_,
                 kernel_library, device, json_path, fps, {k: dit[k] for k in PROMPT_OPTIONS}, strength,
                 dit["cache_from"] or "output")
        else:
            unet_only = {"--steps": steps, "--kernel-library": kernel_library,
                         "--backend": None if backend == "auto" else backend}
            given = [name for name, value in unet_only.items() if value is not None]
            if given:
                raise UserError(f"{', '.join(given)}: options of a U-Net model, not of --dit")
            _run_dit(model, dit, source, frames, seed, output, fast, no_cuda_graph, compile_, device, json_path, fps)
    except MirageError as e:
        raise UserError(str(e)) from e
    except KeyboardInterrupt:  # Ctrl-C while the model loads, before the frame loop takes the signal over
        click.echo("interrupted (SIGINT) before the first frame; nothing was written", err=True)
        raise SystemExit(128 + signal.SIGINT) from None


def _run(model, source, frames, steps, seed, output, backend, fast, no_cuda_graph, compile_, kernel_library, device,
         json_path, fps, prompt, strength, cache_from):
    from tqdm import tqdm

    from mirage.bridge.pipeline import load_pipeline

    _check_outputs(output, json_path, fast, device, source)
    embeds = None if prompt["prompt_embeds"] is None else read_embeddings(prompt["prompt_embeds"])  # before loading
    shape_in = input_size(source) if source not in (None, "synthetic") else None
    # the video is written as bytes: the frame graph makes them, and only they cross PCIe
    # (a DiT's strength is also its ceiling: nothing changes it mid-run, so each block runs only the passes it needs)
    common = dict(steps=steps, cuda_graph=not no_cuda_graph, kernel_library=kernel_library, frames="uint8",
                  strength=strength, **({} if strength is None else {"max_strength": strength, "cache_from": cache_from}))
    options = PipelineOptions.fastest(**common) if fast else \
        PipelineOptions(compile="default" if compile_ else None, **common)
    writer = VideoWriter(output, fps=fps)  # the path and format are checked before any frame is made
    pipe = load_pipeline(model, backend=backend, device=device, options=options)
    with pipe, _writing(writer), _Stop() as stop:
        _condition(pipe, model, steps, prompt, embeds)  # before reset: nothing is allocated yet
        n = pipe.frames_per_step  # a block model's step makes several frames
        shape = pipe.frame_shape[:2]  # (height, width)
        restyles = "strength" in pipe.controls  # a DiT's video-to-video: its input is the frames themselves
        if pipe.video_to_video:
            _warn_if_enlarged(source, shape_in, shape)
            pairs = restyle_inputs(source or "synthetic", shape, frames, pipe.frames_in) if restyles else \
                v2v_inputs(source or "synthetic", shape, frames)
        elif source is not None:
            raise UserError(f"{model} is a generation model and takes no --input; use a video-to-video model")
        else:
            pairs = ((None, None) for _ in range(-(-frames // n)))  # whole steps
        start = time.perf_counter()
        pipe.reset(seed)  # allocates, warms up and captures on first use
        setup = time.perf_counter() - start
        with tqdm(total=-(-frames // n) * n, desc="frames", unit="frame") as bar:
            run = run_pipelined(pipe, pairs, writer.write, lambda: stop.signal is not None,
                                lambda seconds: (bar.set_postfix(ms=f"{seconds * 1e3:.1f}"), bar.update()))
        times, psnrs = run.frame_seconds, run.psnrs
        if not times:
            raise UserError(f"{source}: no frames could be read")
        backend_name = type(pipe.backend).__name__.replace("Backend", "").lower()
        described = pipe.describe()
        graphs = bool(pipe.graphs)
    report, rows = _summary(model, backend_name, described, graphs, seed, setup, times, run.step_seconds[0], writer,
                            stop)
    report.update(options=options.__dict__, steps=pipe.steps, frames_are=pipe.frames_are, pipeline=run.report())
    if n > 1:
        _block_report(report, rows, run.step_seconds, n)
        rows.append(("frames", pipe.frames_are))
    rows += run.rows()
    if psnrs and restyles:
        _restyle_report(report, rows, strength, psnrs, cache_from)
    elif psnrs:
        report["psnr_db"] = float(np.mean(psnrs))
        rows.append(("PSNR vs. ground truth", f"{report['psnr_db']:.2f} dB"))
    _finish(report, rows, json_path, stop, len(times), frames, "frames")


def _check_takes_strength(model: Path, source: str | None) -> None:
    """--strength without --dit: only a DiT artifact takes it. A U-Net (checkpoint or artifact) is refused before
    its --input is checked, in one line that says what --strength is for and all the U-Net needs changed (a
    newcomer was told that --strength needs an --input, then given one that the U-Net takes no strength, then,
    for a generating U-Net, that it takes no --input); a DiT checkpoint trained here is told its --dit."""
    if (model / G.MANIFEST).is_file():
        manifest = read_manifest(model)
        if manifest.get("family", ModelConfig.family) != ModelConfig.family:
            return
        cfg = from_json(ModelConfig, manifest["model"])
    else:
        from mirage.train.checkpoint import check_not_dit, model_config, read_meta

        check_not_dit(model)
        cfg = model_config(read_meta(model), model)
    generates = cfg.task == "generate"
    does = "generates from no input" if generates else "restores its --input as trained"
    leave = "--strength and --input" if generates and source is not None else "--strength"
    raise UserError(f"--strength is a DiT's video-to-video strength (how much of its --input a --dit checkpoint or a "
                    f"DiT artifact redraws); {model} is a U-Net that {does}: leave out {leave}")


def _artifact_strength(model: Path, source: str | None, strength: float | None) -> float | None:
    """The strength of a run without --dit: --strength, or with --input to a DiT artifact with an encoder graph
    the strength a DiT checkpoint's --input runs at (a U-Net, which has no strength, gets None)."""
    if strength is not None or source is None or not (model / G.MANIFEST).is_file():
        return strength
    return DEFAULT_STRENGTH if G.ENCODE in read_manifest(model)["graphs"] else None


def _restyle_report(report: dict, rows: list[tuple[str, str]], strength: float, psnrs: list[float],
                    cache_from: str) -> None:
    """What video-to-video at a strength adds to the report: the strength, what the cache held, and how close the
    output stays to its input."""
    report.update(strength=strength, cache_from=cache_from, psnr_vs_input_db=float(np.mean(psnrs)))
    rows += [("strength / PSNR vs. input", f"{strength} / {report['psnr_vs_input_db']:.2f} dB"),
             ("KV cache from", f"the {cache_from} blocks")]


def _warn_if_enlarged(source: str | None, shape_in: tuple[int, int] | None, shape: tuple[int, int]) -> None:
    """An input smaller than the model's (height, width) frames has its center window of their aspect enlarged
    (core/video_io.py: fit_frame): say so."""
    if shape_in is None:
        return
    _, _, ch, cw = center_crop(shape_in[1], shape_in[0], shape)
    if ch < shape[0] or cw < shape[1]:
        window = "square" if ch == cw else f"{cw}x{ch}"
        click.echo(f"warning: {source} is {shape_in[0]}x{shape_in[1]}; its center {window} is enlarged to the "
                   f"model's {shape[1]}x{shape[0]}", err=True)


def _restyled(pipe, source: str, blocks: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Video-to-video: (output frames, input frames) of each block of `source` (read as needed, frames of the
    model's size), each block as many frames as it gives back (`frames_in`: with TAEHV the first block
    takes 3 fewer); a last block the input cannot fill is not made."""
    cfg = pipe.cfg
    frames = cfg.video_frames(blocks * cfg.block_frames, first=True)
    inputs = iter(source_frames(source, (cfg.height, cfg.width), frames,
                                lambda f: to_float(f) if f.dtype == np.uint8 else f))
    for _ in range(blocks):
        n = pipe.frames_in
        block = list(itertools.islice(inputs, n))
        if len(block) < n:
            return
        block = np.stack(block)
        yield pipe.restyle(block), block


def _run_dit(checkpoint, dit, source, frames, seed, output, fast, no_cuda_graph, compile_, device, json_path, fps):
    """A Wan DiT run: every check on the CPU first (DiTPipeline.open), then blocks written as they finish;
    with --input, video-to-video (DiTPipeline.restyle) at --strength."""
    from tqdm import tqdm

    from mirage.model.dit_pipeline import DiTPipeline, DiTSpec, blocks_for
    from mirage.train.dit import PROMPT_FILE

    if (checkpoint is None) == (not dit["random_weights"]):
        raise UserError("--dit needs a checkpoint (MODEL) or --random-weights, not both" if checkpoint else
                        "--dit needs a checkpoint: MODEL, a Wan 2.1 DiT file or folder (or --random-weights)")
    trained = None if checkpoint is None else Path(checkpoint) / PROMPT_FILE  # a DiT trained here saves its prompt
    if dit["prompt"] is None and dit["prompt_embeds"] is None and trained is not None and trained.is_file():
        click.echo(f"note: no --prompt: {trained}, the prompt it was trained with", err=True)
        dit["prompt_embeds"] = trained
    if (dit["prompt"] is None) == (dit["prompt_embeds"] is None):
        raise UserError("--dit needs one of --prompt TEXT (with --text-encoder FOLDER) or --prompt-embeds FILE")
    DiTSpec(dit["config"], resolution=dit["resolution"]).dit_config()  # a bad config or resolution: before the files
    _check_outputs(output, json_path, fast, device, source)
    shape_in = input_size(source) if source not in (None, "synthetic") else None  # an unreadable input: before loading
    spec = DiTSpec(dit["config"], checkpoint, dit["lora"], dit["decoder"], dit["text_encoder"], dit["resolution"],
                   dit["window"], dit["sink"])
    writer = VideoWriter(output, fps=fps)  # the path and format are checked before any frame is made
    if dit["fp8"] and shared.on_cpu(device):  # allowed (it shows FP8's error), but not what --fp8 is for
        click.echo(FP8_ON_CPU, err=True)
    pipe = DiTPipeline.open(spec, dit["prompt"] if dit["prompt"] is not None else dit["prompt_embeds"], device,
                            compile=compile_ or fast, graph=False if no_cuda_graph else (True if fast else None),
                            fp8=dit["fp8"], video_to_video=source is not None)
    blocks = dit["blocks"] or blocks_for(pipe.cfg, frames)
    with pipe, _writing(writer), _Stop() as stop:
        start = time.perf_counter()
        pipe.reset(seed)  # compiles and captures every cache fill level on first use
        setup = time.perf_counter() - start
        block_times, frame_times, psnrs = [], [], []
        total = pipe.cfg.video_frames(blocks * pipe.cfg.block_frames, first=True)  # video-to-video's too
        if source is not None:
            pipe.set_strength(DEFAULT_STRENGTH if dit["strength"] is None else dit["strength"])
            pipe.set_cache_from(dit["cache_from"] or "output")
            _warn_if_enlarged(source, shape_in, (pipe.cfg.height, pipe.cfg.width))
            work = _restyled(pipe, source, blocks)
        else:
            work = ((block, None) for block in pipe.blocks(blocks))
        with tqdm(total=total, desc="frames", unit="frame") as bar:
            for (block, inputs), seconds in _timed(work, stop, bar, lambda item: len(item[0])):
                block_times.append(seconds)
                frame_times += [seconds / len(block)] * len(block)  # a block's frames arrive together
                for frame in block:
                    writer.write(frame)
                if inputs is not None:
                    psnrs.append(float(psnr(block, inputs).mean()))
        if not block_times:
            raise UserError("interrupted before the first block" if stop.signal is not None else
                            f"{source}: fewer frames than one block")
        described = pipe.describe()
        graphs = pipe.graphed
    report, rows = _summary(checkpoint or "random weights", "pytorch", described, graphs, seed, setup, frame_times,
                            block_times[0], writer, stop)
    report.update(dit=dataclasses.asdict(pipe.cfg), compile=pipe.compiled,
                  weights=dataclasses.asdict(pipe.weights) if pipe.weights else None, fp8=pipe.fp8)
    _block_report(report, rows, block_times, pipe.cfg.block_frames)
    if psnrs:
        _restyle_report(report, rows, pipe.strength, psnrs, pipe.cache_from)
    _finish(report, rows, json_path, stop, len(block_times), blocks, "blocks")


def _block_report(report: dict, rows: list[tuple[str, str]], block_times: list[float], latent_frames: int) -> None:
    """The per-block latency a block model adds to the report (a block's frames arrive together)."""
    per_block = latency_summary(block_times)
    report.update(blocks=len(block_times), block_median_ms=per_block["median_ms"], block_p99_ms=per_block["p99_ms"])
    rows.insert(4, ("per-block median / p99", f"{report['block_median_ms']:.1f} / {report['block_p99_ms']:.1f} ms "
                                              f"({len(block_times)} blocks of {latent_frames} latent frames)"))


def _condition(pipe, model, steps: int | None, prompt: dict, embeds) -> None:
    """A prompt model's prompt (embeddings, or text through --text-encoder); refused for a model without one.
    Its steps are its own: --steps must agree."""
    from mirage.bridge.source import condition

    if steps is not None and steps != pipe.steps:
        raise UserError(f"--steps {steps}: {model} samples with its own {pipe.steps} steps per block; leave out --steps")
    condition(pipe, model, prompt["prompt"], embeds, prompt["text_encoder"])


def _check_outputs(output: Path, json_path: Path | None, fast: bool, device: str, source: str | None) -> None:
    """What a run writes, and --fast, are checked before any model loads."""
    if json_path is not None and not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    if json_path is not None and same_path(json_path, output):  # the report would replace the video
        raise UserError(f"--json {json_path} is the --output; write the report somewhere else")
    shared.check_fast(fast, device)
    for written in filter(None, (output, json_path)):
        check_not_input(written, source)


@contextlib.contextmanager
def _writing(writer: VideoWriter) -> Iterator[VideoWriter]:
    """The run's writer: a run that fails after its first frame (an input frame that cannot be read, a full
    disk) leaves an earlier output as it was and keeps the frames made under a name that says so
    (VideoWriter.kept: out.partial.mp4); its one error line says where."""
    try:
        with writer:
            yield writer
    except MirageError as e:
        if writer.kept is None:
            raise
        raise UserError(f"{e}; the {writer.count} frames made before it are in {writer.kept}, {writer.path} was "
                        f"not written") from e


def _timed(work: Iterator, stop: _Stop, bar, frames=lambda item: 1) -> Iterator[tuple[object, float]]:
    """Each item of `work` (made when asked for) with the seconds its making took; ends after the item in
    progress once a signal has come. The bar advances by an item's `frames` (one, or a block's)."""
    while stop.signal is None:
        start = time.perf_counter()
        item = next(work, None)
        if item is None:
            return
        seconds = time.perf_counter() - start
        bar.set_postfix(ms=f"{seconds * 1e3:.1f}")
        bar.update(frames(item))
        yield item, seconds


def _summary(model, backend: str, described: tuple, graphs: bool, seed: int, setup: float, frame_times: list[float],
             first: float, writer: VideoWriter, stop: _Stop) -> tuple[dict, list[tuple[str, str]]]:
    """The report and closing table both model families give (the U-Net per frame, the DiT per block)."""
    device_name, peak, peak_kind = described
    report = {"model": str(model), "backend": backend, "device": device_name, "cuda_graph": graphs, "seed": seed,
              "setup_ms": setup * 1e3, **latency_summary(frame_times, first), "output": str(writer.path),
              "written": writer.count, "peak_gpu_mb": peak, "interrupted": stop.signal is not None}
    rows = [("output", f"{writer.path} ({writer.count} frames)"),
            ("backend / device", f"{backend} / {device_name}{' (CUDA graph)' if graphs else ''}"),
            ("time to first frame", f"{report['first_frame_ms']:.1f} ms (+ {report['setup_ms']:.0f} ms setup)"),
            ("per-frame median / p99", f"{report['median_ms']:.2f} / {report['p99_ms']:.2f} ms"),
            ("FPS", f"{report['fps']:.1f}"),
            ("GPU memory", f"{peak:.0f} MiB ({peak_kind})" if peak is not None else "n/a (CPU)")]
    return report, rows


def _finish(report: dict, rows: list[tuple[str, str]], json_path: Path | None, stop: _Stop, done: int, asked: int,
            unit: str) -> None:
    made = f"{done} of {asked} {unit}"
    if stop.signal is not None:
        click.echo(f"interrupted ({signal.Signals(stop.signal).name}) after {made}; {report['output']} holds "
                   f"them", err=True)
    elif done < asked:  # not an error: a clip shorter than --frames is all there is to restore
        click.echo(f"note: the input ended after {made}", err=True)
    click.echo(table(rows))
    if json_path:
        write_json(json_path, report)
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)


if __name__ == "__main__":
    main()
