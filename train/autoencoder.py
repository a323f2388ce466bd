"""The autoencoder stage: train a TAESD-layout autoencoder from scratch on frames, and its checkpoints.

No pretrained network is available here (nothing can be downloaded), so the losses compare the
reconstruction with the input frame only:

    loss = (1 - a) * L1 + a * (1 - MS-SSIM) + w * latent_reg,   a = 0.84 (Zhao et al. 2017's mix)

latent_reg pulls every latent channel towards zero mean and unit variance over the batch, so the
diffusion model can take latents about as they are (the bundled ae-tiny stopped at std 0.4-0.6:
measure before choosing a latent config's scaling_factor).
There is no adversarial term: it is only worth its cost where L1 + MS-SSIM leave visible blur,
which was not measured here.

Checkpoint folder:
    config.json          {"autoencoder": AutoencoderConfig, "train": TrainConfig, "step": ..., ...}
    model.safetensors    AutoencoderTiny weights (EMA when on), diffusers' key names
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from mirage import __version__
from mirage.core.config import AutoencoderConfig, TrainConfig, to_json
from mirage.model.autoencoder import Autoencoder, build_autoencoder
from mirage.model.ssim import ms_ssim
from mirage.train.checkpoint import CONFIG, WEIGHTS, save_unit
from mirage.train.codec import load_autoencoder
from mirage.train.data import ClipStream, batches, make_source
from mirage.train.trainer import StopOnSignal, ema_update, lr_at, optimizer_step, pick_device

SSIM_MIX = 0.84  # the default a
LATENT_REG = 0.01


def reconstruction_loss(recon: torch.Tensor, frames: torch.Tensor, mix: float = SSIM_MIX) -> torch.Tensor:
    """(1 - a) L1 + a (1 - MS-SSIM) between (B, 3, H, W) frames in [-1, 1]; MS-SSIM on [0, 1] images."""
    l1 = (recon - frames).abs().mean()
    structural = 1 - ms_ssim((recon.clamp(-1, 1) + 1) / 2, (frames + 1) / 2).mean()
    return (1 - mix) * l1 + mix * structural


def latent_reg(latents: torch.Tensor) -> torch.Tensor:
    """Mean over channels of mean^2 + (std - 1)^2, statistics over batch and positions."""
    flat = latents.transpose(0, 1).flatten(1)  # (C, B*h*w)
    return (flat.mean(1).pow(2) + (flat.std(1) - 1).pow(2)).mean()


def train_autoencoder(cfg: AutoencoderConfig, tcfg: TrainConfig, out: str | Path, crop: int = 128,
                      device: str = "auto", workers: int = 0, resume: bool = True, ssim_mix: float = SSIM_MIX,
                      progress: bool = True) -> dict:
    """Train on crop x crop frames of tcfg.data into checkpoint folder `out` until step tcfg.steps;
    returns a summary. `workers` processes make the frames (a GPU outruns one CPU core making
    256x256 detailed frames).

    With resume, a checkpoint already in `out` must have the same config (else CheckpointError
    naming both values) and training continues from its step and weights (the optimizer state is
    not kept). Saves every tcfg.save_every steps, every tcfg.save_minutes and when SIGINT / SIGTERM
    asks it to stop (the summary's "stopped_by" names the signal)."""
    out, dev = Path(out), pick_device(device)
    torch.manual_seed(tcfg.seed)
    model = build_autoencoder(cfg)
    step = 0
    if resume and (out / CONFIG).is_file():
        saved, meta = load_autoencoder(out, expect=cfg)
        model.load_state_dict(saved.state_dict())
        step = meta["step"]
    model = model.to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if tcfg.ema_decay else None
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    stream = ClipStream(make_source(tcfg.data, crop, 1, tcfg.seed), 1, seed=tcfg.seed + 1000 * step)
    loader = batches(stream, tcfg.batch_size, workers, pin_memory=dev.type == "cuda")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16")
    losses: list[float] = []
    begin = last_save = time.perf_counter()
    stopped = False
    with StopOnSignal(print if progress else lambda _: None) as stop:
        while step < tcfg.steps and not stopped:
            frames = next(loader)[:, 0].to(dev, non_blocking=True)  # (B, 1, 3, H, W) clips of one frame
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tcfg)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                latents = model.encode(frames)
                recon = model.decode(latents)
            loss = reconstruction_loss(recon.float(), frames, ssim_mix) + LATENT_REG * latent_reg(latents.float())
            optimizer_step(opt, scaler, loss, model, tcfg.grad_clip)
            step += 1
            if ema is not None:
                ema_update(ema, model, min(tcfg.ema_decay, step / (9 + step)))
            losses.append(loss.item())
            stopped = stop.received is not None
            recent = losses[-tcfg.log_every:]
            if progress and (step % tcfg.log_every == 0 or step == tcfg.steps):
                print(f"step {step}: loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - begin:.0f} s)",
                      flush=True)
            if (step % tcfg.save_every == 0 or step == tcfg.steps or stopped
                    or time.perf_counter() - last_save >= 60 * tcfg.save_minutes):
                save_autoencoder(out, ema if ema is not None else model, tcfg, step, extra={
                    "loss": sum(recent) / len(recent), "crop": crop, "ssim_mix": ssim_mix, "device": str(dev),
                    "train_seconds": time.perf_counter() - begin})
                last_save = time.perf_counter()
    recent = losses[-tcfg.log_every:] or [float("nan")]
    return {"step": step, "loss": sum(recent) / len(recent), "first_loss": losses[0] if losses else float("nan"),
            "seconds": time.perf_counter() - begin, "out": str(out), "stopped_by": stop.received if stopped else None,
            "trained_steps": len(losses)}


def save_autoencoder(out: str | Path, model: Autoencoder, tcfg: TrainConfig | None, step: int,
                     extra: dict | None = None) -> Path:
    meta = {"autoencoder": to_json(model.cfg), "train": to_json(tcfg) if tcfg else None, "step": step,
            "mirage_version": __version__, **(extra or {})}
    weights = {k: v.detach().float().contiguous().cpu() for k, v in model.taesd.state_dict().items()}
    return save_unit(out, {WEIGHTS: weights}, meta)  # one unit with its hash, like a diffusion checkpoint


@torch.no_grad()
def reconstruct(model: Autoencoder, frames: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Decode(encode(frames)) clamped to [-1, 1], in chunks: (N, 3, H, W) -> (N, 3, H, W)."""
    return torch.cat([model(chunk).clamp(-1, 1) for chunk in frames.split(batch)])

