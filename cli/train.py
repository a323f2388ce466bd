"""`mirage-train`: train a Mirage model on synthetic video or a folder of videos."""
from __future__ import annotations

import json

import click

from mirage.core.config import AE_CONFIGS, CONFIGS, TASKS, ConfigError, TrainConfig, get_ae_config, get_config
from mirage.model.unet import MirageUNet, parameter_count


class MirageError(click.ClickException):
    """A user error: one line on stderr, exit status 2."""

    exit_code = 2


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--stage", type=click.Choice(["diffusion", "autoencoder"]), default="diffusion",
              help="diffusion: the video model; autoencoder: the latent autoencoder (TAESD layout) on single frames.")
@click.option("--ae-config", type=click.Choice(list(AE_CONFIGS)), default="taesd-tiny",
              help="Autoencoder size (--stage autoencoder). 'taesd-tiny' trains on a CPU in minutes.")
@click.option("--crop", type=click.IntRange(min=16), default=128,
              help="Frame size the autoencoder trains on (--stage autoencoder); it is fully convolutional.")
@click.option("--ssim-mix", type=click.FloatRange(0, 1), default=0.84,
              help="Autoencoder loss: (1 - a) L1 + a (1 - MS-SSIM); this is a (--stage autoencoder).")
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=TrainConfig.ema_decay,
              help="EMA of weights; 0 turns it off.")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="tiny",
              help="Model size. 'tiny' trains on a laptop CPU in minutes.")
@click.option("--task", type=click.Choice(TASKS), default="generate",
              help="generate: frames from the context memory alone; v2v: restore full color to an input stream (luma + coarse chroma) frame by frame.")
@click.option("--data", default=None,
              help="'synthetic', 'detailed' (camera-like, any size), 'photos' (scikit-image's photographs) or a folder "
                   "of videos / image-sequence sub-folders. Default: synthetic (diffusion), detailed (autoencoder).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Checkpoint folder. Default: runs/tiny (diffusion), runs/<ae-config> (autoencoder).")
@click.option("--steps", type=click.IntRange(min=1), default=TrainConfig.steps, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, help="Clips per step (per GPU).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr, help="Peak learning rate.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help="Autocast precision (fp16 adds a gradient scaler).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=False, help="Recompute ResBlocks to save memory.")
@click.option("--context-noise-max", type=click.IntRange(0, 999), default=TrainConfig.context_noise_max,
              help="History augmentation: context frames are noised to t_ctx ~ U[0, this]. 0 turns it off.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Data-loading worker processes.")
@click.option("--resume/--no-resume", default=True, help="Continue from --out if it holds a checkpoint.")
@click.option("--seed", type=int, default=0)
@click.option("--dry-run", is_flag=True, help="Print the config and parameter count, train nothing.")
def main(stage, ae_config, crop, ssim_mix, ema_decay, config_name, task, data, out, steps, batch_size, lr, precision,
         grad_checkpoint, context_noise_max, device, workers, resume, seed, dry_run):
    """Train a Mirage video diffusion model into a checkpoint folder (safetensors + config JSON).

    Runs on the CPU by default; uses the GPU with --device cuda (or auto), and all GPUs when
    launched with `torchrun --nproc-per-node N -m mirage.cli.train ...`.
    """
    from mirage.train.checkpoint import CheckpointError
    from mirage.train.data import DataError
    from mirage.train.trainer import train

    if stage == "autoencoder":
        return _autoencoder_stage(ae_config, data or "detailed", out or f"runs/{ae_config}", steps, batch_size, lr,
                                  precision, ema_decay, ssim_mix, crop, device, workers, resume, seed, dry_run)
    data, out = data or "synthetic", out or "runs/tiny"
    try:
        cfg = get_config(config_name, task)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, precision=precision,
                           ema_decay=ema_decay, grad_checkpoint=grad_checkpoint, context_noise_max=context_noise_max,
                           context_noise_prob=TrainConfig.context_noise_prob if context_noise_max else 0.0,
                           data=data, seed=seed)
        import torch

        with torch.device("meta"):
            params = parameter_count(MirageUNet(cfg))
        click.echo(f"model {cfg.name} ({task}): {params / 1e6:.2f}M parameters", err=True)
        if dry_run:
            click.echo(json.dumps({"model": cfg.__dict__, "train": tcfg.__dict__}, indent=2, default=list))
            return
        summary = train(cfg, tcfg, out, resume=resume, device=device, workers=workers)
    except (ConfigError, DataError, CheckpointError, RuntimeError) as e:
        raise MirageError(str(e)) from e
    click.echo(json.dumps(summary))


def _autoencoder_stage(ae_config, data, out, steps, batch_size, lr, precision, ema_decay, ssim_mix, crop, device,
                       workers, resume, seed, dry_run) -> None:
    from mirage.model.autoencoder import AutoencoderError
    from mirage.train.autoencoder import train_autoencoder
    from mirage.train.checkpoint import CheckpointError
    from mirage.train.data import DataError

    try:
        cfg = get_ae_config(ae_config)
        if crop % cfg.downscale:
            raise ConfigError(f"--crop {crop} must be a multiple of the autoencoder's downscale {cfg.downscale}")
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, precision=precision, ema_decay=ema_decay,
                           data=data, seed=seed)
        if dry_run:
            click.echo(json.dumps({"autoencoder": cfg.__dict__, "train": tcfg.__dict__, "crop": crop,
                                   "ssim_mix": ssim_mix}, indent=2, default=list))
            return
        summary = train_autoencoder(cfg, tcfg, out, crop=crop, device=device, workers=workers, resume=resume,
                                    ssim_mix=ssim_mix)
    except (ConfigError, DataError, CheckpointError, AutoencoderError, RuntimeError) as e:
        raise MirageError(str(e)) from e
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
