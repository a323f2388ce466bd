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

from mirage.cli import options
from mirage.cli.errors import UserError
from mirage.core.config import (AE_CONFIGS, CONFIGS, DMD_EXITS, DMD_LR, TASKS, ConfigError, ModelConfig, TrainConfig, check_same,
                                from_json, get_ae_config, get_config)
from mirage.core.errors import MirageError


# command-line option -> the TrainConfig fields it sets
TRAIN_OPTIONS = {"steps": ["steps"], "batch_size": ["batch_size"], "lr": ["lr"], "precision": ["precision"],
                 "grad_checkpoint": ["grad_checkpoint"], "context_noise_max": ["context_noise_max", "context_noise_prob"],
                 "data": ["data"], "seed": ["seed"], "save_minutes": ["save_minutes"], "init_from": ["init_from"],
                 "self_forcing_prob": ["self_forcing_prob"], "self_forcing_horizon": ["self_forcing_horizon"],
                 "self_forcing_strength": ["self_forcing_strength"], "ema_decay": ["ema_decay"],
                 "distill_from": ["distill_from", "self_forcing_steps"],
                 "student_steps": ["student_steps", "self_forcing_steps"], "latent_cache": ["latent_cache"],
                 "dmd_from": ["dmd_from", "self_forcing_steps"], "dmd_fake_updates": ["dmd_fake_updates"],
                 "dmd_regression": ["dmd_regression"], "dmd_exit": ["dmd_exit"]}


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _resumed(ctx: click.Context, out: Path, saved: dict, cfg: ModelConfig,
             tcfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """Resuming: the checkpoint's configs, with only the options given on the command line taken
    from this run (`cfg`, `tcfg`); the trainer says which of them differ."""
    from mirage.train.checkpoint import CheckpointError, model_config

    model_given = _given(ctx, "config_name") or _given(ctx, "task") or _given(ctx, "init_from") \
        or _given(ctx, "distill_from") or _given(ctx, "dmd_from")
    given = {field: getattr(tcfg, field) for opt, fields in TRAIN_OPTIONS.items() if _given(ctx, opt) for field in fields}
    try:
        saved_tcfg = dataclasses.replace(from_json(TrainConfig, saved["train"]), **given)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{out / 'config.json'}: bad train config ({e})") from e
    return (cfg if model_given else model_config(saved, out)), saved_tcfg


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@options.group(
    "run",
    click.option("--stage", type=click.Choice(["diffusion", "autoencoder"]), default="diffusion",
                 help="diffusion: the video model; autoencoder: the latent autoencoder (TAESD layout) on single "
                      "frames."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Checkpoint folder. Default: runs/tiny (diffusion), runs/<ae-config> (autoencoder). With "
                      "--distill-chain: the folder of the students, OUT/s2, OUT/s1, ..."),
    click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
    click.option("--workers", type=click.IntRange(min=0), default=0, help="Data-loading worker processes."),
    click.option("--resume/--no-resume", default=True,
                 help="Continue from --out if it holds a checkpoint (options not given are taken from it)."),
    click.option("--dry-run", is_flag=True, help="Print the config and parameter count, train nothing."))
@options.group(
    "autoencoder",
    click.option("--ae-config", type=click.Choice(list(AE_CONFIGS)), default="taesd-tiny",
                 help="Autoencoder size (--stage autoencoder). 'taesd-tiny' trains on a CPU in minutes."),
    click.option("--crop", type=click.IntRange(min=16), default=128,
                 help="Frame size the autoencoder trains on (--stage autoencoder); it is fully convolutional."),
    click.option("--ssim-mix", type=click.FloatRange(0, 1), default=0.84,
                 help="Autoencoder loss: (1 - a) L1 + a (1 - MS-SSIM); this is a (--stage autoencoder)."))
@options.group(
    "model",
    click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, show_default="tiny",
                 help="Model size. 'tiny' trains on a laptop CPU in minutes. With --init-from / --distill-from: that "
                      "checkpoint's."),
    click.option("--task", type=click.Choice(TASKS), default=None, show_default="generate",
                 help="generate: frames from the context memory alone; v2v: restore full color to an input stream "
                      "(luma + coarse chroma) frame by frame."))
@options.group(  # TrainConfig fields, by their names
    "train",
    click.option("--data", default=None,
                 help="'synthetic', 'detailed' (camera-like, any size), 'photos' (scikit-image's photographs) or a "
                      "folder of videos / image-sequence sub-folders. Default: synthetic (diffusion), detailed "
                      "(autoencoder)."),
    click.option("--steps", type=click.IntRange(min=1), default=TrainConfig.steps, help="Optimizer steps."),
    click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size,
                 help="Clips per step (per GPU)."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr,
                 help=f"Peak learning rate (with --dmd-from: {DMD_LR:g} unless given)."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                 help="Autocast precision (fp16 adds a gradient scaler)."),
    click.option("--grad-checkpoint/--no-grad-checkpoint", default=False, help="Recompute ResBlocks to save memory."),
    click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=TrainConfig.ema_decay,
                 help="EMA of weights; 0 turns it off."),
    click.option("--context-noise-max", type=click.IntRange(0, 999), default=TrainConfig.context_noise_max,
                 help="History augmentation: context frames are noised to t_ctx ~ U[0, this]. 0 turns it off."),
    click.option("--save-minutes", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.save_minutes,
                 help=f"Save a checkpoint at least this often (wall clock), besides every {TrainConfig.save_every} "
                      "steps and at the end."),
    click.option("--latent-cache", type=click.IntRange(min=0), default=TrainConfig.latent_cache, metavar="CLIPS",
                 help="Latent models: make and encode this many clips once (per process under torchrun), then train "
                      "on their latents (no frames made or encoded per step; each clip is seen about steps x batch / "
                      "CLIPS times). 0: fresh clips every step."),
    click.option("--seed", type=int, default=0),
    click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
                 help="Fine-tune: start from this checkpoint's weights (its model config; a fresh optimizer)."),
    click.option("--self-forcing-prob", type=click.FloatRange(0, 1), default=TrainConfig.self_forcing_prob,
                 help="Fraction of steps trained on the model's own rollouts: the newest context frames are its own, "
                      "generated with the runtime's DDIM steps and context noise (no gradient through them)."),
    click.option("--self-forcing-horizon", type=click.IntRange(min=1), default=TrainConfig.self_forcing_horizon,
                 help="Frames the model generates itself before the loss frame (at most the context length)."),
    click.option("--self-forcing-strength", type=click.FloatRange(0, 1, min_open=True),
                 default=TrainConfig.self_forcing_strength,
                 help="1: the model generates those frames from pure noise; below 1: from the real frames partly "
                      "noised (SDEdit), so they keep the real content and carry the model's own errors (generation: "
                      "keeps the loss target predictable)."),
    click.option("--distill-from", type=click.Path(exists=True, file_okay=False), default=None,
                 help="Progressive distillation: train a student of this teacher checkpoint (which it starts from) "
                      "to sample in --student-steps steps what the teacher does in twice as many."),
    click.option("--student-steps", type=click.IntRange(min=1), default=None,
                 help="The student's DDIM steps (with --distill-from); recorded in its checkpoint, and mirage-run "
                      "uses it when --steps is not given."),
    click.option("--dmd-from", type=click.Path(exists=True, file_okay=False), default=None,
                 help="Distribution matching distillation (DMD2): fine-tune this checkpoint's model (which it starts "
                      "from) on its own samples, pulled toward the checkpoint's frozen denoiser and away from a second "
                      "copy trained on those samples. Add --self-forcing-prob to sample from its own context."),
    click.option("--dmd-fake-updates", type=click.IntRange(min=1), default=TrainConfig.dmd_fake_updates,
                 help="With --dmd-from: fake-score steps (each on a fresh batch and sample) per generator step."),
    click.option("--dmd-regression", type=click.FloatRange(min=0), default=TrainConfig.dmd_regression,
                 help="With --dmd-from: weight of the ordinary v-loss on real clips added to the generator's loss (an "
                      "anchor: at 0 DMD overshoots into moving noise)."),
    click.option("--dmd-exit", type=click.Choice(DMD_EXITS), default=TrainConfig.dmd_exit,
                 help="With --dmd-from: the generator's DDIM step that gets the gradient (the earlier ones run "
                      "without): random (Self-Forcing: every step learns) or last (the frame the runtime emits)."))
@options.group(
    "chain",
    click.option("--distill-chain", default=None, metavar="N,N/2,...,1",
                 help="Progressive distillation in stages: the teacher of --distill-from samples with the first "
                      "count, each stage's student with the next (half of the one before) and teaches the next "
                      "stage; the students are OUT/s2, OUT/s1, ... A rerun resumes the stage it stopped in."))
@click.pass_context
def main(ctx, run: dict, autoencoder: dict, model: dict, train: dict, chain: dict):
    """Train a Mirage video diffusion model into a checkpoint folder (safetensors + config JSON).

    Runs on the CPU by default; uses the GPU with --device cuda (or auto), and all GPUs when
    launched with `torchrun --nproc-per-node N -m mirage.cli.train ...`. Ctrl-C saves and exits.
    """
    if run["stage"] == "autoencoder":
        return _autoencoder_stage(ctx, autoencoder, train, run)
    out = run["out"] or Path("runs/tiny")
    try:
        if chain["distill_chain"]:
            return _distill_chain(ctx, chain["distill_chain"], model, train, run, out)
        cfg, tcfg = _configs(ctx, model, train, out, run["resume"])
        if run["dry_run"]:
            return _dry_run(cfg, tcfg)
        from mirage.train.trainer import train as train_model

        summary = train_model(cfg, tcfg, out, resume=run["resume"], device=run["device"], workers=run["workers"])
    except MirageError as e:
        raise UserError(str(e)) from e
    _finish(ctx, summary, tcfg.steps, out, ["mirage-train", "--out", str(out)])


def _configs(ctx: click.Context, model: dict, train: dict, out: Path, resume: bool) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configs of a diffusion run: the options given, the checkpoint a run
    starts from (--init-from / --distill-from / --dmd-from) and, resuming, the one in `out`."""
    from mirage.core.schedule import default_steps
    from mirage.train.checkpoint import CONFIG, read_meta

    config_name, task, opts = model["config_name"], model["task"], dict(train)
    source = opts["distill_from"] or opts["init_from"] or opts["dmd_from"]
    cfg = get_config(config_name or "tiny", task or "generate")
    if source:  # the model is the checkpoint's; an explicit --config / --task must agree with it
        saved = from_json(ModelConfig, read_meta(source)["model"])
        if config_name or task:
            check_same(saved, get_config(config_name or saved.name, task or saved.task))
        cfg = saved
    if opts["student_steps"] and not opts["distill_from"]:
        raise ConfigError("--student-steps needs --distill-from TEACHER")
    if opts["dmd_from"] and not _given(ctx, "lr"):
        opts["lr"] = DMD_LR
    for path in ("data", "init_from", "distill_from", "dmd_from"):  # unset: the config's default
        opts[path] = opts[path] or getattr(TrainConfig, path)
    opts["student_steps"] = opts["student_steps"] or 0
    tcfg = TrainConfig(**opts, context_noise_prob=TrainConfig.context_noise_prob if opts["context_noise_max"] else 0.0,
                       self_forcing_steps=opts["student_steps"] or (default_steps(read_meta(source)) if source else
                                                                    TrainConfig.self_forcing_steps))
    if resume and (out / CONFIG).is_file():
        cfg, tcfg = _resumed(ctx, out, read_meta(out), cfg, tcfg)
    dmd_only = [f"--{name.replace('_', '-')}" for name in ("dmd_fake_updates", "dmd_regression", "dmd_exit")
                if _given(ctx, name)]
    if dmd_only and not tcfg.dmd_from:  # neither given nor resumed
        raise ConfigError(f"{' and '.join(dmd_only)} need(s) --dmd-from TEACHER")
    _say_size(cfg)
    return cfg, tcfg


def _say_size(cfg: ModelConfig) -> None:
    import torch

    from mirage.model.unet import MirageUNet, parameter_count

    with torch.device("meta"):
        params = parameter_count(MirageUNet(cfg))
    click.echo(f"model {cfg.name} ({cfg.task}): {params / 1e6:.2f}M parameters", err=True)


def _dry_run(cfg: ModelConfig, tcfg: TrainConfig) -> None:
    click.echo(json.dumps({"model": cfg.__dict__, "train": tcfg.__dict__}, indent=2, default=list))


def _distill_chain(ctx: click.Context, text: str, model: dict, train: dict, run: dict, out: Path) -> None:
    """--distill-chain: each stage is the run `--distill-from PREVIOUS --student-steps N --out OUT/sN`."""
    from mirage.train.chain import chain_stages
    from mirage.train.trainer import train as train_model

    if not train["distill_from"] or train["student_steps"]:
        raise ConfigError("--distill-chain needs --distill-from TEACHER (the first stage's teacher) and takes no "
                          "--student-steps (the chain names them)")
    stages = chain_stages(text, train["distill_from"], out)
    if run["dry_run"]:  # a later stage's teacher is an earlier one's student, not trained yet
        click.echo(json.dumps([{"student_steps": s.student_steps, "teacher": str(s.teacher), "out": str(s.out)}
                               for s in stages], indent=2))
        return
    resume_line = ["mirage-train", *_given_options(ctx)]
    for stage in stages:
        cfg, tcfg = _configs(ctx, model, {**train, "distill_from": str(stage.teacher),
                                          "student_steps": stage.student_steps}, stage.out, run["resume"])
        summary = train_model(cfg, tcfg, stage.out, resume=run["resume"], device=run["device"], workers=run["workers"])
        _finish(ctx, summary, tcfg.steps, stage.out, resume_line)


def _finish(ctx, summary: dict, steps: int, out, resume: list[str]) -> None:
    """Print the summary; a run a signal stopped says where it saved and exits 128 + the signal."""
    click.echo(json.dumps(summary))
    if summary["stopped_by"]:
        click.echo(f"stopped by {summary['stopped_by']} at step {summary['step']} of {steps}; checkpoint saved "
                   f"in {out}; resume with: {shlex.join(resume)}", err=True)
        ctx.exit(128 + signal.Signals[summary["stopped_by"]].value)


def _autoencoder_stage(ctx, autoencoder: dict, train: dict, run: dict) -> None:
    from mirage.train.autoencoder import train_autoencoder

    ae_config, crop, ssim_mix = autoencoder["ae_config"], autoencoder["crop"], autoencoder["ssim_mix"]
    out, steps = run["out"] or f"runs/{ae_config}", train["steps"]
    try:
        cfg = get_ae_config(ae_config)
        if crop % cfg.downscale:
            raise ConfigError(f"--crop {crop} must be a multiple of the autoencoder's downscale {cfg.downscale}")
        tcfg = TrainConfig(data=train["data"] or "detailed", **{k: train[k] for k in (
            "steps", "batch_size", "lr", "precision", "ema_decay", "seed", "save_minutes")})
        if run["dry_run"]:
            click.echo(json.dumps({"autoencoder": cfg.__dict__, "train": tcfg.__dict__, "crop": crop,
                                   "ssim_mix": ssim_mix}, indent=2, default=list))
            return
        summary = train_autoencoder(cfg, tcfg, out, crop=crop, device=run["device"], workers=run["workers"],
                                    resume=run["resume"], ssim_mix=ssim_mix)
    except MirageError as e:
        raise UserError(str(e)) from e
    # the autoencoder stage takes nothing back from its checkpoint: the resume line repeats every option given
    _finish(ctx, summary, steps, out, ["mirage-train", *_given_options(ctx)])


def _given_options(ctx: click.Context) -> list[str]:
    """The options this command was given, as command-line arguments."""
    args: list[str] = []
    for param in ctx.command.params:
        if isinstance(param, click.Option) and _given(ctx, param.name):
            value = ctx.params[param.name]
            if param.is_flag:
                args += (param.opts if value else param.secondary_opts)[:1]
            else:
                args += [param.opts[0], str(value)]
    return args


if __name__ == "__main__":
    main()
