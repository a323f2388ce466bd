"""`mirage-export`: a checkpoint -> ONNX graphs, parity report, INT8, TensorRT engines, manifest."""
from __future__ import annotations

import time
from pathlib import Path

import click
from click.core import ParameterSource

from mirage.cli.errors import UserError
from mirage.core.config import DIT_CONFIGS, get_dit_config
from mirage.core.errors import MirageError
from mirage.core.graphs import PRECISIONS
from mirage.engine.manifest import BACKENDS, RTX_TARGETS

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"


def _unused_option(ctx: click.Context, backend: str, precision: str) -> str | None:
    """The first option given on the command line that this build would not use, as a message."""
    unused = {"gpus": ("--gpu", backend != "tensorrt-rtx", "chooses TensorRT-RTX targets: add --backend tensorrt-rtx"),
              "opt_level": ("--opt-level", backend == "onnx", "tunes the engine build: add --backend tensorrt(-rtx)"),
              "workspace_mb": ("--workspace-mb", backend == "onnx",
                               "limits the engine build: add --backend tensorrt(-rtx)"),
              "plugin_library": ("--plugin-library", backend == "onnx",
                                 "is loaded to build engines: add --backend tensorrt"),
              "calib_frames": ("--calib-frames", precision in ("fp32", "bf16"),
                               f"calibrates int8/fp8 and measures fp16's range: {precision} uses none")}
    for name, (flag, idle, why) in unused.items():
        if idle and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            return f"{flag} {why}"
    return None


def _dit_choice(ctx: click.Context, dit: str | None, weights: Path | None, random_weights: bool) -> str | None:
    """What is wrong with the DiT options given, as a message (a DiT takes exactly one source of weights)."""
    if not dit:
        return "--dit-weights / --random-weights / --decoder belong to a DiT's export: add --dit NAME" \
            if weights or random_weights or ctx.params.get("decoder") else None
    if ctx.get_parameter_source("checkpoint") is ParameterSource.COMMANDLINE:
        return "--checkpoint is a U-Net checkpoint folder; a DiT takes --dit-weights (or --random-weights)"
    if bool(weights) == random_weights:
        return f"--dit {dit}: give either --dit-weights PATH or --random-weights"
    return None


def _gpus(ctx, param, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    gpus = tuple(v.strip().lower().replace("_", "") for v in value.split(",") if v.strip())
    bad = [g for g in gpus if g not in RTX_TARGETS]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: TensorRT-RTX targets are {', '.join(RTX_TARGETS)} "
                                 "(for another GPU build with --backend tensorrt on it)")
    return gpus


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_CHECKPOINT,
              help="Checkpoint folder (config.json + model.safetensors).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16",
              help="fp32 reference; fp16; bf16 (a DiT only: bf16 inside, float32 I/O; parity on ONNX Runtime runs "
                   "its widened twin); int8 / fp8 = explicit Q/DQ (INT8, or FP8 E4M3 for Ada/Hopper/Blackwell) "
                   "calibrated on real rollout inputs (needs ModelOpt).")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnx",
              help="onnx: graphs only. tensorrt-rtx builds on the CPU (no GPU needed); tensorrt needs its GPU.")
@click.option("--gpu", "gpus", callback=_gpus, default=None,
              help="TensorRT-RTX target compute capabilities, comma-separated (sm80,sm86,sm89,sm120; "
                   "fp8 defaults to sm89,sm120, the targets with FP8 tensor cores).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts/tiny"),
              help="Artifact folder to write.")
@click.option("--batch", type=click.IntRange(1, 256), default=1,
              help="Batch: independent streams per call (static, or TensorRT's optimum with --max-batch).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Make the batch dimension dynamic, 1..MAX_BATCH (one engine, an optimization profile).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, help="TensorRT builder optimization level.")
@click.option("--workspace-mb", type=click.IntRange(min=16), default=None,
              help="TensorRT workspace limit in MiB [default: 1024; 4096 with --dit, as wan-1.3b's block needs 3.4 GiB].")
@click.option("--plugin-library", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TensorRT plugin library (.so) to load before parsing; its hash goes into the manifest.")
@click.option("--temporal-attention", type=click.Choice(["onnx", "plugin"]), default="onnx",
              help="onnx: stock ops (opset-23 Attention); plugin: one custom node per layer for the plugins_cpp "
                   "TensorRT plugin (needs --plugin-library to build engines).")
@click.option("--calib-frames", type=click.IntRange(min=1), default=8, help="Rollout frames for INT8/FP8 calibration.")
@click.option("--parity-frames", type=click.IntRange(min=2), default=50, help="Frames of the rollout parity check.")
@click.option("--allow-parity-failure", is_flag=True,
              help="Write the artifact even if it fails parity against PyTorch (recorded in the manifest).")
@click.option("--dit", type=click.Choice(list(DIT_CONFIGS)), default=None,
              help="Export this chunk-causal video DiT (its block step, cache write and text graphs) instead of "
                   "a U-Net checkpoint; weights from --dit-weights or --random-weights.")
@click.option("--dit-weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="The DiT's checkpoint: a Self-Forcing / CausVid / LongLive file, or a Wan / diffusers folder.")
@click.option("--random-weights", is_flag=True, help="The DiT with random weights (seed 0): for tests and sizes.")
@click.option("--decoder", type=click.Path(path_type=Path), default=None,
              help="--dit: a TAEHV file (taew2_1.pth), exported as the DiT's codec: its decode graph, and encode "
                   "(video-to-video) when the file has the encoder.* weights. mirage-run / mirage-serve --dit's "
                   "--decoder; the Wan VAE is not a runtime codec.")
def main(checkpoint, precision, backend, gpus, out, batch, max_batch, opt_level, workspace_mb, plugin_library,
         temporal_attention, calib_frames, parity_frames, allow_parity_failure, dit, dit_weights, random_weights,
         decoder):
    """Export a Mirage checkpoint to ONNX, check it against PyTorch, and build TensorRT engines.

    Writes OUT/manifest.json, the ONNX graphs, and (TensorRT backends) the engines with a
    per-layer view of each. Parity is ONNX Runtime on the CPU against PyTorch, per tensor and
    as the PSNR of a whole rollout.
    """
    from mirage.bridge.artifact import ArtifactOptions, artifact_files, build_artifact

    if max_batch is not None and batch > max_batch:
        raise UserError(f"--batch {batch} is larger than --max-batch {max_batch}")
    ctx = click.get_current_context()
    unused = _unused_option(ctx, backend, precision) or _dit_choice(ctx, dit, dit_weights, random_weights)
    if unused:
        raise UserError(unused)
    options = ArtifactOptions(precision=precision, backend=backend, batch=batch, max_batch=max_batch, gpus=gpus,
                              calibration_frames=calib_frames, parity_frames=parity_frames,
                              optimization_level=opt_level, workspace_mb=workspace_mb, plugin_library=plugin_library,
                              temporal_attention=temporal_attention, allow_parity_failure=allow_parity_failure)
    start = time.perf_counter()

    def progress(stage: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {stage}", err=True)

    try:
        if dit:
            from mirage.bridge.dit_artifact import build_dit_artifact

            manifest = build_dit_artifact(get_dit_config(dit), out, options, dit_weights, progress=progress,
                                          decoder=decoder)
        else:
            manifest = build_artifact(checkpoint, out, options, progress)
    except MirageError as e:
        raise UserError(str(e)) from e
    par = manifest["parity"]
    click.echo(f"\nartifact {out}  ({manifest['precision']}, backend {manifest['backend']['name']}"
               f"{' ' + manifest['backend']['version'] if manifest['backend']['version'] else ''}, "
               f"{manifest['build_seconds']:.1f} s)")
    for name, size in artifact_files(out):
        click.echo(f"  {name:<28} {size / 2**20:9.2f} MiB")
    click.echo(f"parity vs. PyTorch (tolerance rel {par['tolerance_rel']:g}):")
    for name, t in par["tensors"].items():
        verdict = "ok" if t["rel"] <= par["tolerance_rel"] else "OVER"
        click.echo(f"  {name:<4} rel {t['rel']:.2e}  max abs {t['max_abs']:.2e}  {verdict}")
    r = par["rollout"]
    click.echo(f"  rollout of {r['frames']} {r.get('unit', 'frames')}, PSNR vs. PyTorch: "
               f"mean {r['psnr_mean_db']:.1f} dB, min {r['psnr_min_db']:.1f} dB")
    if "video_psnr_mean_db" in r:  # a DiT with a decoder graph: the frames those latents decode to
        click.echo(f"  its decoded video frames, PSNR vs. PyTorch: mean {r['video_psnr_mean_db']:.1f} dB, "
                   f"min {r['video_psnr_min_db']:.1f} dB")
    for graph, meta in manifest["graphs"].items():  # recorded in the manifest too: never silently missing
        if meta.get("engine_refused"):
            click.echo(f"warning: no {graph} engine: {meta['engine_refused']}", err=True)
    if "fp16_headroom" in par:
        click.echo(f"  fp16: largest activation {par['fp16_activation_peak']:.1f} ({par['fp16_headroom']:.0f}x "
                   "below the fp16 maximum)")
    if par["override"]:
        click.echo("warning: parity FAILED; written anyway because of --allow-parity-failure (recorded in the "
                   "manifest)", err=True)


if __name__ == "__main__":
    main()
