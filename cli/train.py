"""`mirage-train`: train a Mirage model on synthetic video or a folder of videos.

Ctrl-C (SIGINT) or SIGTERM finishes the step in progress, saves a checkpoint, prints where and
how to resume, and exits with the shell's status for that signal (130 / 143), so scripts and
schedulers still see that the run did not finish. Resuming into a checkpoint folder takes every
option not given on the command line from the checkpoint, so `mirage-train --out DIR` continues
a run as it was; options given and different from the checkpoint are said in one line.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import signal
from pathlib import Path

import click
from click.core import ParameterSource

from mirage.core.config import CONFIGS, TASKS, ConfigError, TrainConfig, get_config
from mirage.model.unet import MirageUNet, parameter_count


class MirageError(click.ClickException):
    """A user error: one line on stderr, exit status 2."""

    exit_code = 2


# command-line option -> TrainConfig field it sets
TRAIN_OPTIONS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "precision": "precision",
                 "grad_checkpoint": "grad_checkpoint", "context_noise_max": "context_noise_max", "data": "data",
                 "seed": "seed", "save_minutes": "save_minutes"}


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _configs(ctx: click.Context, saved: dict | None):
    """Model and train configs: from the options, or, resuming, the checkpoint's values for
    every option not given."""
    from mirage.core.config import from_json
    from mirage.train.checkpoint import CheckpointError, model_config

    p = ctx.params
    options = {field: p[opt] for opt, field in TRAIN_OPTIONS.items() if saved is None or _given(ctx, opt)}
    if "context_noise_max" in options:  # 0 turns history augmentation off entirely
        options["context_noise_prob"] = TrainConfig.context_noise_prob if options["context_noise_max"] else 0.0
    if saved is None:
        return get_config(p["config_name"], p["task"]), TrainConfig(**options)
    model_given = _given(ctx, "config_name") or _given(ctx, "task")
    out = p["out"]
    cfg = get_config(p["config_name"], p["task"]) if model_given else model_config(saved, out)
    try:
        tcfg = dataclasses.replace(from_json(TrainConfig, saved["train"]), **options)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{out}/config.json: bad train config ({e})") from e
    return cfg, tcfg


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="tiny",
              help="Model size. 'tiny' trains on a laptop CPU in minutes.")
@click.option("--task", type=click.Choice(TASKS), default="generate",
              help="generate: frames from the context memory alone; v2v: restore full color to an input stream (luma + coarse chroma) frame by frame.")
@click.option("--data", default="synthetic",
              help="'synthetic' (made on the fly) or a folder of videos / image-sequence sub-folders.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="runs/tiny",
              help="Checkpoint folder.")
@click.option("--steps", type=click.IntRange(min=1), default=TrainConfig.steps, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, help="Clips per step (per GPU).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr, help="Peak learning rate.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help="Autocast precision (fp16 adds a gradient scaler).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=False, help="Recompute ResBlocks to save memory.")
@click.option("--context-noise-max", type=click.IntRange(0, 999), default=TrainConfig.context_noise_max,
              help="History augmentation: context frames are noised to t_ctx ~ U[0, this]. 0 turns it off.")
@click.option("--save-minutes", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.save_minutes,
              help=f"Save a checkpoint at least this often (wall clock), besides every {TrainConfig.save_every} steps and at the end.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Data-loading worker processes.")
@click.option("--resume/--no-resume", default=True,
              help="Continue from --out if it holds a checkpoint (options not given are taken from it).")
@click.option("--seed", type=int, default=0)
@click.option("--dry-run", is_flag=True, help="Print the config and parameter count, train nothing.")
@click.pass_context
def main(ctx, config_name, task, data, out, steps, batch_size, lr, precision, grad_checkpoint, context_noise_max,
         save_minutes, device, workers, resume, seed, dry_run):
    """Train a Mirage video diffusion model into a checkpoint folder (safetensors + config JSON).

    Runs on the CPU by default; uses the GPU with --device cuda (or auto), and all GPUs when
    launched with `torchrun --nproc-per-node N -m mirage.cli.train ...`. Ctrl-C saves and exits.
    """
    from mirage.train.checkpoint import CONFIG, CheckpointError, read_meta
    from mirage.train.data import DataError
    from mirage.train.trainer import train

    try:
        saved = read_meta(out) if resume and (out / CONFIG).is_file() else None
        cfg, tcfg = _configs(ctx, saved)
        import torch

        with torch.device("meta"):
            params = parameter_count(MirageUNet(cfg))
        click.echo(f"model {cfg.name} ({cfg.task}): {params / 1e6:.2f}M parameters", err=True)
        if dry_run:
            click.echo(json.dumps({"model": cfg.__dict__, "train": tcfg.__dict__}, indent=2, default=list))
            return
        summary = train(cfg, tcfg, out, resume=resume, device=device, workers=workers)
    except (ConfigError, DataError, CheckpointError) as e:
        raise MirageError(str(e)) from e
    click.echo(json.dumps(summary))
    if summary["stopped_by"]:
        click.echo(f"stopped by {summary['stopped_by']} at step {summary['step']} of {tcfg.steps}; checkpoint saved "
                   f"in {out}; resume with: {shlex.join(['mirage-train', '--out', str(out)])}", err=True)
        ctx.exit(128 + signal.Signals[summary["stopped_by"]].value)


if __name__ == "__main__":
    main()
