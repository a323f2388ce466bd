"""`mirage-train`: train a Mirage model on synthetic video or a folder of videos."""
from __future__ import annotations

import json

import click

from mirage.cli.errors import UserError
from mirage.core.config import (AE_CONFIGS, CONFIGS, TASKS, ConfigError, ModelConfig, TrainConfig, check_same, from_json,
                                get_ae_config, get_config)
from mirage.core.errors import MirageError


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
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, show_default="tiny",
              help="Model size. 'tiny' trains on a laptop CPU in minutes. With --init-from / --distill-from: that "
                   "checkpoint's.")
@click.option("--task", type=click.Choice(TASKS), default=None, show_default="generate",
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
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Fine-tune: start from this checkpoint's weights (its model config; a fresh optimizer).")
@click.option("--self-forcing-prob", type=click.FloatRange(0, 1), default=TrainConfig.self_forcing_prob,
              help="Fraction of steps trained on the model's own rollouts: the newest context frames are its own, "
                   "generated with the runtime's DDIM steps and context noise (no gradient through them).")
@click.option("--self-forcing-horizon", type=click.IntRange(min=1), default=TrainConfig.self_forcing_horizon,
              help="Frames the model generates itself before the loss frame (at most the context length).")
@click.option("--self-forcing-strength", type=click.FloatRange(0, 1, min_open=True),
              default=TrainConfig.self_forcing_strength,
              help="1: the model generates those frames from pure noise; below 1: from the real frames partly noised "
                   "(SDEdit), so they keep the real content and carry the model's own errors (generation: keeps the "
                   "loss target predictable).")
@click.option("--distill-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Progressive distillation: train a student of this teacher checkpoint (which it starts from) "
                   "to sample in --student-steps steps what the teacher does in twice as many.")
@click.option("--student-steps", type=click.IntRange(min=1), default=None,
              help="The student's DDIM steps (with --distill-from); recorded in its checkpoint, and mirage-run "
                   "uses it when --steps is not given.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Data-loading worker processes.")
@click.option("--resume/--no-resume", default=True, help="Continue from --out if it holds a checkpoint.")
@click.option("--seed", type=int, default=0)
@click.option("--dry-run", is_flag=True, help="Print the config and parameter count, train nothing.")
def main(stage, ae_config, crop, ssim_mix, ema_decay, config_name, task, data, out, steps, batch_size, lr, precision,
         grad_checkpoint, context_noise_max, init_from, self_forcing_prob, self_forcing_horizon, self_forcing_strength,
         distill_from, student_steps, device, workers, resume, seed, dry_run):
    """Train a Mirage video diffusion model into a checkpoint folder (safetensors + config JSON).

    Runs on the CPU by default; uses the GPU with --device cuda (or auto), and all GPUs when
    launched with `torchrun --nproc-per-node N -m mirage.cli.train ...`.
    """
    from mirage.core.schedule import default_steps
    from mirage.model.unet import MirageUNet, parameter_count
    from mirage.train.checkpoint import read_meta
    from mirage.train.trainer import train

    if stage == "autoencoder":
        return _autoencoder_stage(ae_config, data or "detailed", out or f"runs/{ae_config}", steps, batch_size, lr,
                                  precision, ema_decay, ssim_mix, crop, device, workers, resume, seed, dry_run)
    data, out = data or "synthetic", out or "runs/tiny"
    try:
        source = distill_from or init_from
        cfg = get_config(config_name or "tiny", task or "generate")
        if source:  # the model is the checkpoint's; an explicit --config / --task must agree with it
            saved = from_json(ModelConfig, read_meta(source)["model"])
            if config_name or task:
                check_same(saved, get_config(config_name or saved.name, task or saved.task))
            cfg = saved
        if student_steps and not distill_from:
            raise ConfigError("--student-steps needs --distill-from TEACHER")
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, precision=precision,
                           ema_decay=ema_decay, grad_checkpoint=grad_checkpoint, context_noise_max=context_noise_max,
                           context_noise_prob=TrainConfig.context_noise_prob if context_noise_max else 0.0,
                           data=data, seed=seed, init_from=init_from or "", distill_from=distill_from or "",
                           student_steps=student_steps or 0, self_forcing_prob=self_forcing_prob,
                           self_forcing_horizon=self_forcing_horizon, self_forcing_strength=self_forcing_strength,
                           self_forcing_steps=student_steps or (default_steps(read_meta(source)) if source else
                                                                TrainConfig.self_forcing_steps))
        import torch

        with torch.device("meta"):
            params = parameter_count(MirageUNet(cfg))
        click.echo(f"model {cfg.name} ({cfg.task}): {params / 1e6:.2f}M parameters", err=True)
        if dry_run:
            click.echo(json.dumps({"model": cfg.__dict__, "train": tcfg.__dict__}, indent=2, default=list))
            return
        summary = train(cfg, tcfg, out, resume=resume, device=device, workers=workers)
    except MirageError as e:
        raise UserError(str(e)) from e
    click.echo(json.dumps(summary))


def _autoencoder_stage(ae_config, data, out, steps, batch_size, lr, precision, ema_decay, ssim_mix, crop, device,
                       workers, resume, seed, dry_run) -> None:
    from mirage.train.autoencoder import train_autoencoder

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
    except MirageError as e:
        raise UserError(str(e)) from e
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
