"""`python -m mirage.cli.train_dit`: train a chunk-causal video DiT (mirage.train.dit) on this machine's GPU
or CPU, bounded by a wall-clock budget. Ctrl-C (SIGINT) or SIGTERM ends it after the step in progress and saves the
weights so far, then exits with the shell's status for that signal (130 / 143), as mirage-train does.

    python -m mirage.cli.train_dit --out checkpoints/dit-tiny-taesd --minutes 20
"""
from __future__ import annotations

import signal

import click

from mirage.cli.errors import UserError
from mirage.cli.options import device as device_name
from mirage.core.config import DIT_CONFIGS
from mirage.core.errors import MirageError


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, help="Checkpoint folder (model.safetensors, config.json, prompt.safetensors).")
@click.option("--config", type=click.Choice([n for n, c in DIT_CONFIGS.items() if c.autoencoder]),
              default="dit-tiny-taesd", help="A DiT config on a per-frame autoencoder.")
@click.option("--minutes", type=click.FloatRange(min=0), default=20.0,
              help="Wall-clock budget of the steps; encoding the clips comes before it and takes at most "
                   "half as long.")
@click.option("--max-steps", type=click.IntRange(min=1), default=100_000)
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--clips", type=click.IntRange(min=1), default=512,
              help="Clips made and encoded once, at most: no more than the steps draw (--max-steps x --batch-size) "
                   "or half the --minutes encodes.")
@click.option("--latents", default="", help="A .safetensors file keeping the encoded clips for the next run.")
@click.option("--context-noise", type=click.FloatRange(0, 1), default=0.1, help="Largest σ of the context's noise.")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="torch CPU threads; on a shared CPU more mostly wait at barriers (on this project's 2-core CPU "
                   "beside other jobs: 24 s a step with 2, 1.3 s with 1; alone, about 0.2 s with 1).")
@click.option("--device", default="auto", callback=device_name,
              help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N: where the clips are encoded and trained on.")
@click.option("--seed", type=int, default=0)
def main(out, config, minutes, max_steps, batch_size, lr, clips, latents, context_noise, threads, device, seed):
    """Train a DiT with teacher forcing and flow matching; saves the EMA weights at the end."""
    from mirage.train.dit import DiTTrainOptions, train_dit
    from mirage.train.trainer import pick_device

    try:
        meta = train_dit(DiTTrainOptions(out=out, config=config, minutes=minutes, max_steps=max_steps,
                                         batch_size=batch_size, lr=lr, clips=clips, latents=latents, context_noise=context_noise,
                                         threads=threads, device=str(pick_device(device)), seed=seed))
    except MirageError as e:
        raise UserError(str(e)) from e
    click.echo(f"{out}: {meta['step']} steps in {meta['train_seconds']:.0f} s, loss {meta['loss']:.4f}")
    if meta["stopped_by"]:
        click.echo(f"stopped by {meta['stopped_by']}; the weights after {meta['step']} steps are saved in {out}",
                   err=True)
        raise SystemExit(128 + signal.Signals[meta["stopped_by"]].value)


if __name__ == "__main__":
    main()
