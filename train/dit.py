"""Training a chunk-causal video DiT with flow matching, on latents of a per-frame autoencoder.

The clips (`window_frames` frames of the `detailed` synthetic data, the U-Net's) are made and encoded
once by the config's frozen autoencoder (train/latent_cache.py), then every step is teacher forcing
(CausVid, Self-Forcing's teacher-forcing baseline) in one forward over 2·W frames:

    [ context: the W clean frames, lightly noised ] [ noisy: the same W frames, each block at its own σ ]

Both halves sit at the same absolute positions (RoPE). A context frame attends as `block_causal_mask`
says (what the cache holds at inference); a noisy frame of block b attends to the context frames of
the blocks before b that its window holds (the sink and the last window - sink frames up to its
block's end) and to the noisy frames of its own block: exactly what a block sees at inference after
the cache-write passes of its predecessors. The loss is flow matching on the noisy half only:
x_σ = (1 - σ) x_0 + σ ε at t = 1000 σ, target v = ε - x_0.

The context is labelled with the config's context timestep (0: clean), as the cache-write pass labels
it, but carries noise of σ up to `context_noise` (Self-Forcing's context_noise, MirageLSD's history
augmentation): at inference the cache holds the model's own imperfect predictions, and a model that
learned to read slightly wrong context drifts less over long rollouts.

    train_dit(DiTTrainOptions(out="runs/dit", minutes=20))   # or python -m mirage.cli.train_dit
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mirage.core.config import DiTConfig, get_dit_config, to_json
from mirage.core.files import as_created, sha256_file
from mirage.model.dit import WanDiT, block_causal_mask
from mirage.model.latent import autoencoder_folder, load_frame_codec
from mirage.train.checkpoint import check_writable, save_unit
from mirage.train.data import ClipStream, batches, make_source
from mirage.train.latent_cache import LatentCache
from mirage.train.trainer import StopOnSignal, ema_update

PROMPT_FILE = "prompt.safetensors"  # the embeddings the model was trained with, saved beside it
# the most time the clips' encoding takes before the steps, as a share of their budget: 512 clips took about 7
# minutes of a shared CPU core, which a 1-minute run spent before its first step; a 20-minute run encodes them all
ENCODE_SHARE = 0.5
LOSS_EVERY = 50  # steps between reads of the losses (the bar shows their mean)


@dataclass(frozen=True)
class DiTTrainOptions:
    out: str
    config: str = "dit-tiny-taesd"
    minutes: float = 20.0  # wall-clock budget of the steps (the clips' encoding comes before it: ENCODE_SHARE)
    max_steps: int = 100_000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    clips: int = 512  # clips made and encoded once (latent cache), at most: encoded_clips
    latents: str = ""  # a .safetensors file keeping the encoded clips for the next run (made if missing)
    context_noise: float = 0.1  # largest σ of the noise on the context frames
    ema_decay: float = 0.995
    data: str = "detailed"
    seed: int = 0
    threads: int = 1  # one: on a CPU shared with other processes, a second thread mostly waits at barriers
    device: str = "cpu"  # where the clips are encoded and the steps run ("cuda": the clips stay on the GPU too)
    progress: bool = True


def teacher_forcing_mask(cfg: DiTConfig, frames: int) -> torch.Tensor:
    """(2F·T, 2F·T) bool for [context F frames | noisy F frames] at positions 0..F-1 each (module docstring)."""
    positions = torch.arange(frames)
    n, local = cfg.block_frames, cfg.window_frames - cfg.sink_frames
    block = positions // n
    q_end = ((block + 1) * n)[:, None]
    k_pos = positions[None, :]
    earlier = (block[None, :] < block[:, None]) & ((k_pos >= q_end - local) | (k_pos < cfg.sink_frames))
    same = block[None, :] == block[:, None]
    tokens = cfg.tokens_per_frame
    noisy_rows = torch.cat([earlier, same], dim=1).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    never = torch.zeros(frames * tokens, frames * tokens, dtype=torch.bool)  # context never sees noisy frames
    context_rows = torch.cat([block_causal_mask(cfg, positions), never], dim=1)
    return torch.cat([context_rows, noisy_rows], dim=0)


def flow_matching_loss(model: WanDiT, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                       context_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Teacher-forcing loss of clean latent clips (B, C, F, h, w) (module docstring)."""
    cfg, (b, _, frames) = model.cfg, latents.shape[:3]
    blocks = frames // cfg.block_frames

    def per_frame(x: torch.Tensor) -> torch.Tensor:  # (B, blocks) -> (B, F): one value per block
        return x.repeat_interleave(cfg.block_frames, dim=1)

    device = latents.device  # the generator's too
    sigma = per_frame(torch.rand(b, blocks, generator=generator, device=device))
    sigma_ctx = per_frame(torch.rand(b, blocks, generator=generator, device=device)) * context_noise
    noise = torch.randn(latents.shape, generator=generator, device=device)
    ctx_noise = torch.randn(latents.shape, generator=generator, device=device)

    def at(s: torch.Tensor) -> torch.Tensor:  # (B, F) -> broadcast over (B, C, F, h, w)
        return s[:, None, :, None, None]

    noisy = (1 - at(sigma)) * latents + at(sigma) * noise
    context = (1 - at(sigma_ctx)) * latents + at(sigma_ctx) * ctx_noise
    t = torch.cat([torch.full_like(sigma, float(cfg.context_timestep)), 1000 * sigma], dim=1)
    positions = torch.arange(frames, device=device).repeat(2)
    v = model(torch.cat([context, noisy], dim=2), t, text, mask=mask, positions=positions)
    return F.mse_loss(v[:, :, frames:], noise - latents)


def encoded_clips(opts: DiTTrainOptions, cfg: DiTConfig) -> torch.Tensor:
    """Clips of window_frames frames, encoded once: (N, C, F, h, w) latents, N up to `opts.clips` but no more than
    the run can use: its steps draw at most max_steps x batch_size, and encoding stops after ENCODE_SHARE of the
    time budget (it comes before the budget; the bar shows it); a run whose budget affords all the clips encodes
    them as before. With `opts.latents`, the first N of that file when it holds as many clips of this shape
    (encoding is most of a short CPU run), else saved there when the run encoded more than it held."""
    wanted = min(opts.clips, opts.max_steps * opts.batch_size)
    shape, held = (cfg.in_dim, cfg.window_frames, *cfg.latent_size), 0
    if opts.latents and Path(opts.latents).is_file():
        kept = load_file(opts.latents)["latents"]
        held = len(kept) if tuple(kept.shape[1:]) == shape else 0
        if held >= wanted:
            return kept[:wanted].to(opts.device)
    codec = load_frame_codec(cfg, opts.device).codec
    stream = ClipStream(make_source(opts.data, cfg.width, cfg.window_frames, opts.seed), cfg.window_frames, opts.seed)
    cache = LatentCache.build(batches(stream, 16, 0, False), codec, wanted, v2v=False, device=torch.device(opts.device),
                              progress=opts.progress, seconds=ENCODE_SHARE * opts.minutes * 60)
    latents = cache.latents.transpose(1, 2).contiguous()  # (N, F, C, h, w) -> (N, C, F, h, w)
    if len(latents) < wanted:
        tqdm.write(f"note: {len(latents)} of {wanted} clips encoded, as many as {ENCODE_SHARE:.0%} of the "
                   f"{opts.minutes:g}-minute budget allowed; a longer run trains on more", file=sys.stderr)
    if opts.latents and len(latents) > held:
        save_file({"latents": latents.cpu()}, opts.latents)
    return latents


def save_dit(out: str | Path, model: WanDiT, text: torch.Tensor, meta: dict) -> Path:
    """model.safetensors (WanModel names: load_dit reads the folder) + config.json {"dit": config, ...},
    and the training prompt's embeddings (PROMPT_FILE, (text_len, text_dim))."""
    out = save_unit(out, {"model.safetensors": {k: v.contiguous() for k, v in model.state_dict().items()}},
                    {"dit": to_json(model.cfg), **meta})
    save_file({"prompt_embeds": text[0].contiguous()}, str(out / PROMPT_FILE))
    as_created(out / PROMPT_FILE)
    return out


def bar_total(step: int, elapsed: float, budget: float, max_steps: int) -> tuple[int, str]:
    """The step a run stops at, by what it knows after `step` steps in `elapsed` seconds, and what stops it:
    the time budget at the pace so far (a step starts while time is left), or --max-steps if that comes first.
    The default cap (100,000) is far beyond a 20-minute budget (~1.3 s a step): a bar counting to it said
    0% and an ETA of 36 hours when the run was about to end."""
    by_time = max(step, math.ceil(budget * step / elapsed)) if elapsed > 0 else max_steps
    return (by_time, "time budget") if by_time < max_steps else (max_steps, "max steps")


def train_dit(opts: DiTTrainOptions) -> dict:
    """Train `opts.config` for `opts.minutes` (or max_steps) on `opts.device`; save the EMA weights. Returns the meta.
    SIGINT / SIGTERM end the run after the step in progress, and the EMA weights so far are saved as at the
    end (the meta's "stopped_by" names the signal), as mirage-train does."""
    check_writable(opts.out)  # before the clips are encoded and trained on: a bad --out fails at once
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    base = get_dit_config(opts.config)
    cfg = dataclasses.replace(base, autoencoder_sha256=sha256_file(autoencoder_folder(base) / "model.safetensors"))
    latents = encoded_clips(opts, cfg)
    device = torch.device(opts.device)
    model, ema = WanDiT(cfg).to(device), WanDiT(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    # the prompt is drawn on the CPU whatever the device: the same seed is the same prompt everywhere
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01)
    mask = teacher_forcing_mask(cfg, cfg.window_frames).to(device)
    generator = torch.Generator(device).manual_seed(opts.seed + 1)
    budget, start, step, losses, shown = opts.minutes * 60, time.monotonic(), 0, [], "-"
    # the bar's total is where the run will stop (bar_total), so that its ETA is the run's end
    with tqdm(total=None, desc=f"train {cfg.name}", unit="step", disable=not opts.progress) as bar, \
            StopOnSignal(lambda message: tqdm.write(message, file=sys.stderr)) as stop:
        while step < opts.max_steps and stop.received is None and (elapsed := time.monotonic() - start) < budget:
            # warmup, then a cosine over the time budget (a run bounded by time, not steps)
            lr = opts.lr * min(1.0, (step + 1) / opts.warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = latents[torch.randint(len(latents), (opts.batch_size,), generator=generator, device=device)]
            loss = flow_matching_loss(model, batch, text.expand(opts.batch_size, -1, -1), mask, opts.context_noise,
                                      generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema_update(ema, model, opts.ema_decay)
            step += 1
            # kept on the device and read every LOSS_EVERY steps: a read each step would wait for the GPU each step
            losses.append(loss.detach())
            bar.total, until = bar_total(step, time.monotonic() - start, budget, opts.max_steps)
            bar.update(1)
            if step % LOSS_EVERY == 0:
                losses[-LOSS_EVERY:] = torch.stack(losses[-LOSS_EVERY:]).tolist()
                shown = f"{sum(losses[-LOSS_EVERY:]) / LOSS_EVERY:.4f}"
            bar.set_postfix(loss=shown, lr=f"{lr:.1e}", until=until)
    last = [float(x) for x in losses[-100:]]
    meta = {"train": dataclasses.asdict(opts), "step": step, "loss": sum(last) / max(1, len(last)),
            "train_seconds": time.monotonic() - start, "clips_used": len(latents), "device": str(device),
            "threads": opts.threads, "stopped_by": stop.received}
    save_dit(opts.out, ema.eval(), text, meta)
    return meta
