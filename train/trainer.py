"""The training loop: AdamW, EMA, autocast, grad clipping, resumable checkpoints, DDP.

One step on a batch of clips (B, K+1, 3, H, W), K = context_frames:

    1. the first K frames are the context; the most recent n of them are valid (n = 0 with
       probability empty_context_prob, so the model also learns the first frame of a video),
       placed in random ring slots with their ages
    2. history augmentation: context frames are noised to a random level t_ctx which the
       context encoder sees as an input (Diffusion Forcing / MirageLSD style)
    3. the last frame is noised to a random t and the model predicts v; loss = MSE

Two variants, configured in TrainConfig:

- self-forcing (a fraction `self_forcing_prob` of the steps): the last `self_forcing_horizon`
  context frames are the model's own, generated without gradient (train/self_forcing.py), and
  every context slot is valid
- distillation (`distill_from`, `student_steps` N): t is one of the student's N timesteps and
  the target is where two DDIM steps of the frozen teacher land (train/distill.py)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mirage.train.checkpoint import STATE, load_checkpoint, load_train_state, read_meta, save_checkpoint
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, check_same, from_json
from mirage.train.codec import autoencoder_sha256, load_codec
from mirage.train.data import ClipStream, make_source, v2v_input
from mirage.train.distill import check_teacher, distill_target, step_table
from mirage.train.self_forcing import is_self_forced_step, self_forced_context
from mirage.model.diffusion import T, q_sample, v_target
from mirage.model.unet import MirageUNet, parameter_count


class TrainStep(nn.Module):
    """The loss as a module forward, so DistributedDataParallel sees one call per step."""

    def __init__(self, model: MirageUNet, tcfg: TrainConfig, teacher: MirageUNet | None = None, codec=None):
        super().__init__()
        self.model, self.tcfg = model, tcfg
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, so DDP and the optimizer skip it
        self.codec = [codec] if codec is not None else []  # a latent model's frozen autoencoder (same reason)

    def forward(self, clips: torch.Tensor, self_forced: bool = False) -> torch.Tensor:
        cfg, tcfg, dev = self.model.cfg, self.tcfg, clips.device
        b, length = clips.shape[:2]
        k = length - 1
        cond_pixels = v2v_input(clips[:, k]) if cfg.cond_channels else None  # (B, 3, S, S)
        if self.codec:  # a latent model learns on the frozen encoder's latents, conditioned on the encoded input
            with torch.no_grad():
                encode = self.codec[0].encode
                clips = encode(clips.flatten(0, 1)).unflatten(0, (b, length))  # (B, K+1, C, H, W)
                cond_pixels = encode(cond_pixels) if cond_pixels is not None else None
        ctx, target = clips[:, :k], clips[:, k]  # (B, K, C, H, W), (B, C, H, W)
        if self_forced:
            ctx = self_forced_context(self.model, clips, tcfg.self_forcing_horizon, tcfg.self_forcing_steps,
                                      tcfg.self_forcing_context_noise, tcfg.self_forcing_strength)
        # 1. valid slots: the n most recent context frames (all of them after a self-forced unroll); frame j is K - j old
        n_valid = torch.randint(1, k + 1, (b,), device=dev)
        n_valid = torch.where(torch.rand(b, device=dev) < tcfg.empty_context_prob, 0, n_valid)
        if self_forced:
            n_valid = torch.full_like(n_valid, k)
        age = torch.arange(k, 0, -1, device=dev).expand(b, k)  # (B, K): [K, ..., 1]
        ages = torch.where(age <= n_valid[:, None], age, 0)
        perm = torch.argsort(torch.rand(b, k, device=dev), dim=1)  # random slot order
        ages = ages.gather(1, perm)
        ctx = ctx[torch.arange(b, device=dev)[:, None], perm]
        # 2. history augmentation
        t_ctx = torch.randint(0, tcfg.context_noise_max + 1, (b,), device=dev)
        t_ctx = torch.where(torch.rand(b, device=dev) < tcfg.context_noise_prob, t_ctx, 0)
        t_ctx = t_ctx.repeat_interleave(k)  # (B*K,)
        flat = ctx.flatten(0, 1)  # (B*K, 3, H, W)
        noised = q_sample(flat, t_ctx, torch.randn_like(flat))
        memory = self.model.context_encode(noised, t_ctx).unflatten(0, (b, k))  # (B, K, 2, N, D)
        # 3. denoising loss on the target frame
        if self.teacher:  # the student's own timesteps
            index = torch.randint(0, tcfg.student_steps, (b,), device=dev)
            t = step_table(tcfg.student_steps).to(dev)[index, 0].long()
        else:
            t = torch.randint(0, T, (b,), device=dev)
        eps = torch.randn_like(target)
        cond = cond_pixels
        x_t = q_sample(target, t, eps)
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad():
                t_memory = teacher.context_encode(noised, t_ctx).unflatten(0, (b, k))
                goal = distill_target(lambda x, t_: teacher.denoise(x, t_, cond, t_memory, ages), x_t, index,
                                      tcfg.student_steps)
        else:
            goal = v_target(target, t, eps)
        v = self.model.denoise(x_t, t, cond, memory, ages)
        return F.mse_loss(v.float(), goal)


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    progress = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
    return tcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def train(model_cfg: ModelConfig, tcfg: TrainConfig, out: str | Path, resume: bool = False,
          device: str = "auto", workers: int = 0, progress: bool = True) -> dict:
    """Train (or resume) into checkpoint folder `out`; returns a summary of the run."""
    out = Path(out)
    rank, world = _distributed()
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    torch.manual_seed(tcfg.seed + rank)
    codec = None
    if model_cfg.latent:  # record which autoencoder the model learns the latents of: loads check it
        model_cfg = dataclasses.replace(model_cfg, autoencoder_sha256=model_cfg.autoencoder_sha256
                                        or autoencoder_sha256(model_cfg.autoencoder))
        codec = load_codec(model_cfg, dev)
    model = MirageUNet(model_cfg).to(dev)
    model.grad_checkpoint = tcfg.grad_checkpoint
    start_from = tcfg.init_from or tcfg.distill_from
    sampling_steps = tcfg.student_steps or None  # what the runtime samples the result with by default
    if start_from:  # fine-tuning and distillation start from the EMA weights (a resume below overrides them)
        start_model, start_meta = load_checkpoint(start_from, dev)
        check_same(start_model.cfg, model_cfg)
        model.load_state_dict(start_model.state_dict())
        sampling_steps = sampling_steps or start_meta.get("sampling_steps")
    teacher = None
    if tcfg.distill_from:
        check_teacher(start_meta, tcfg.student_steps, tcfg.distill_from)
        teacher = start_model.requires_grad_(False)  # in eval mode, as loaded
    if tcfg.self_forcing_prob and not 1 <= tcfg.self_forcing_horizon <= model_cfg.context_frames:
        raise ConfigError(f"self_forcing_horizon={tcfg.self_forcing_horizon}: choose 1 to context_frames="
                          f"{model_cfg.context_frames}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if resume and (out / STATE).is_file():
        check_same(from_json(ModelConfig, read_meta(out)["model"]), model_cfg)
        meta = load_train_state(out, model, ema, opt)
        step, elapsed = meta["step"], meta.get("train_seconds", 0.0)
    source = make_source(tcfg.data, model_cfg.pixels, model_cfg.context_frames + 1, tcfg.seed)
    stream = ClipStream(source, model_cfg.context_frames + 1, seed=tcfg.seed + 1000 * step, rank=rank)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=tcfg.batch_size, num_workers=workers,
                                              pin_memory=dev.type == "cuda"))
    step_fn: nn.Module = TrainStep(model, tcfg, teacher, codec)
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[dev] if dev.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16")
    losses: list[float] = []
    self_forced_steps = 0
    bar = tqdm(total=tcfg.steps, initial=step, disable=not progress or rank != 0, desc="train", unit="step")
    start = time.perf_counter()
    model.train()
    while step < tcfg.steps:
        clips = next(loader).to(dev, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self_forced = is_self_forced_step(tcfg.seed, step, tcfg.self_forcing_prob)
        with autocast:
            loss = step_fn(clips, self_forced)
        self_forced_steps += self_forced
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        ema_update(ema, model, min(tcfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        bar.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            bar.set_postfix(loss=f"{sum(losses[-tcfg.log_every:]) / len(losses[-tcfg.log_every:]):.4f}")
        if rank == 0 and (step % tcfg.save_every == 0 or step == tcfg.steps):
            recent = losses[-tcfg.log_every:]
            save_checkpoint(out, model, ema, tcfg, step, opt, extra={
                "loss": sum(recent) / len(recent), "train_seconds": elapsed + time.perf_counter() - start,
                "parameters": parameter_count(model), "device": str(dev), "world_size": world,
                **({"sampling_steps": sampling_steps} if sampling_steps else {})})
    bar.close()
    recent = losses[-tcfg.log_every:] or [float("nan")]
    return {"step": step, "loss": sum(recent) / len(recent), "first_loss": losses[0] if losses else float("nan"),
            "seconds": elapsed + time.perf_counter() - start, "parameters": parameter_count(model), "out": str(out),
            "self_forced_steps": self_forced_steps, "sampling_steps": sampling_steps}
