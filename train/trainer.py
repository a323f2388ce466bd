"""The training loop: AdamW, EMA, autocast, grad clipping, resumable checkpoints, DDP.

Checkpoints are saved every `save_every` steps, every `save_minutes` of wall-clock time, at the
end, and when SIGINT / SIGTERM asks the run to stop (after the step in progress).

One step on a batch of clips (B, K+1, 3, H, W), K = context_frames:

    1. the first K frames are the context; the most recent n of them are valid (n = 0 with
       probability empty_context_prob, so the model also learns the first frame of a video),
       placed in random ring slots with their ages
    2. history augmentation: context frames are noised to a random level t_ctx which the
       context encoder sees as an input (Diffusion Forcing / MirageLSD style); 1 and 2 are
       train/context.py
    3. the last frame is noised to a random t and the model predicts v; loss = MSE

Three variants, configured in TrainConfig:

- self-forcing (a fraction `self_forcing_prob` of the steps): the last `self_forcing_horizon`
  context frames are the model's own, generated without gradient (train/self_forcing.py), and
  every context slot is valid
- distillation (`distill_from`, `student_steps` N): t is one of the student's N timesteps and
  the target is where two DDIM steps of the frozen teacher land (train/distill.py)
- distribution matching (`dmd_from`): no per-frame target; the model samples frame K itself and
  learns from the difference of a frozen teacher's and a trained fake score's denoisers, on
  `dmd_fake_updates` batches per step (train/dmd.py, `dmd_step`); self-forcing gives it its own
  context
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from mirage.train.checkpoint import (CONFIG, STATE, CheckpointError, check_writable, load_checkpoint, load_train_state,
                                     model_config, read_meta, save_checkpoint)
from mirage.core.errors import MirageError
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, check_same, from_json
from mirage.train.codec import autoencoder_sha256, load_codec
from mirage.train.resources import check_fits
from mirage.train.data import ClipStream, batches, make_source
from mirage.train.latent_cache import LatentCache
from mirage.train.distill import check_teacher
from mirage.train.dmd import DMD
from mirage.train.self_forcing import is_self_forced_step
from mirage.train.step import TrainStep
from mirage.model.unet import MirageUNet, parameter_count


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    progress = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
    return tcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor, model: nn.Module,
                   grad_clip: float) -> float:
    """Backward (scaled for fp16 autocast), clip the gradient norm, step. Returns the gradient
    norm before clipping (fp16's scaler skips a step whose norm is not finite; others take it)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    return 0.0 if scaler.is_enabled() else norm.item()


def dmd_step(dmd: DMD, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
             opt: torch.optim.Optimizer, fake_opt: torch.optim.Optimizer,
             scalers: tuple[torch.amp.GradScaler, torch.amp.GradScaler], autocast: Callable[[], object],
             self_forced: bool, regression: TrainStep) -> tuple[float, float]:
    """One generator step of DMD (train/dmd.py): `dmd_fake_updates` batches, each a fresh sample
    of G that trains the fake score; the last one, sampled with gradient, trains G first (with
    the real clips' v-loss weighted by dmd_regression added). Returns (G's loss, the mean fake loss)."""
    tcfg, updates, fake_losses = dmd.tcfg, dmd.tcfg.dmd_fake_updates, []
    for i in range(updates):
        clips, cond = next_batch()
        last = i == updates - 1
        with autocast():
            sample = dmd.sample(clips, cond, self_forced, grad=last)
        if last:
            with autocast():
                loss = dmd.generator_loss(sample)
                if tcfg.dmd_regression:
                    loss = loss + tcfg.dmd_regression * regression(clips, False, cond)
            optimizer_step(opt, scalers[0], loss, dmd.model, tcfg.grad_clip)
        with autocast():
            fake_loss = dmd.fake_loss(sample)
        optimizer_step(fake_opt, scalers[1], fake_loss, dmd.fake, tcfg.grad_clip)
        fake_losses.append(fake_loss.item())
    return loss.item(), sum(fake_losses) / updates


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu (or auto)")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from e


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM become a request the loop honours between steps: it finishes
    the step, saves and returns. A second Ctrl-C stops at once (KeyboardInterrupt), unsaved.
    Handlers are installed only in the main thread (Python allows no other)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]):
        self.log, self.received, self.previous = log, None, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"{self.received}: finishing this step, then saving a checkpoint"
                 + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""))


def _stop_everywhere(stop: StopOnSignal, world: int, dev: torch.device) -> bool:
    """Every rank stops at the same step if any rank was signalled (torchrun forwards signals,
    but not necessarily between the same two steps)."""
    if world == 1:
        return stop.received is not None
    flag = torch.tensor([stop.received is not None], dtype=torch.int32, device=dev)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def config_changes(saved: TrainConfig, wanted: TrainConfig) -> dict[str, list]:
    """Train-config fields that differ between the checkpoint and this run: {field: [saved, new]}."""
    return {f.name: [getattr(saved, f.name), getattr(wanted, f.name)] for f in dataclasses.fields(TrainConfig)
            if getattr(saved, f.name) != getattr(wanted, f.name)}


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # on its own line, above any progress bar


class TrainingDiverged(MirageError):
    """The loss became NaN or infinite: the run stops there, and nothing after the last good save is kept."""


def check_run(model_cfg: ModelConfig, tcfg: TrainConfig, world: int) -> None:
    """The checks that need the model config, the train config and the launch together (each config
    checks its own fields): run first, before anything is allocated."""
    if tcfg.self_forcing_prob and not 1 <= tcfg.self_forcing_horizon <= model_cfg.context_frames:
        raise ConfigError(f"self_forcing_horizon={tcfg.self_forcing_horizon}: choose 1 to context_frames="
                          f"{model_cfg.context_frames}")
    if tcfg.self_forcing_prob and model_cfg.latent and model_cfg.cond_channels:
        raise ConfigError("self-forcing a latent video-to-video model is not supported: its generated context frames "
                          "would each need their own encoded input frame; train it without --self-forcing-prob")
    if tcfg.dmd_from and world > 1:
        raise ConfigError(f"dmd_from={tcfg.dmd_from} (--dmd-from) trains in one process only (its fake score and "
                          "two-time-scale steps are not wired for DDP); run it without torchrun")
    if tcfg.latent_cache and not model_cfg.latent:
        raise ConfigError(f"latent_cache={tcfg.latent_cache} (--latent-cache): model {model_cfg.name} works on pixels; "
                          "only latent models encode their clips")


@dataclass
class Run:
    """Everything one training run holds: its models and optimizers (`_build`), and where it stands
    (`_resume`, then the loop)."""

    cfg: ModelConfig
    tcfg: TrainConfig
    dev: torch.device
    rank: int
    world: int
    model: MirageUNet
    ema: MirageUNet
    opt: torch.optim.Optimizer
    aux: dict  # models trained beside this one, with their optimizers: DMD's fake score
    teacher: MirageUNet | None  # progressive distillation's frozen teacher
    real: MirageUNet | None  # DMD's frozen real score (the teacher as loaded)
    codec: object | None  # a latent model's frozen autoencoder
    sampling_steps: int | None  # what the runtime samples the result with by default
    step: int = 0
    elapsed: float = 0.0
    saved_loss: float = float("nan")
    resumes: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    fake_losses: list = field(default_factory=list)
    self_forced_steps: int = 0


def train(model_cfg: ModelConfig, tcfg: TrainConfig, out: str | Path, resume: bool = False,
          device: str = "auto", workers: int = 0, progress: bool = True,
          log: Callable[[str], None] = _stderr) -> dict:
    """Train (or resume) into checkpoint folder `out`; returns a summary of the run.

    The summary's "stopped_by" names the signal (SIGINT / SIGTERM) if one ended the run early;
    the checkpoint then holds the last finished step. Resuming says in one `log` line what it
    does: the step it continues from, train-config changes (also recorded in config.json under
    "resumes"), or that nothing is left to train. A NaN or infinite loss stops the run at that
    step with TrainingDiverged; the checkpoint keeps the last step saved before it.
    """
    out = Path(out)
    check_run(model_cfg, tcfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = _distributed()
    dev = _place(pick_device(device), world)
    source = make_source(tcfg.data, model_cfg.pixels, model_cfg.context_frames + 1, tcfg.seed)
    if rank == 0:
        check_writable(out)  # before any work: an unwritable --out would otherwise fail at the first save
    check_fits(model_cfg, tcfg, dev)
    torch.manual_seed(tcfg.seed + rank)
    run = _build(model_cfg, tcfg, dev, rank, world)
    if resume and (out / CONFIG).is_file():
        _resume(run, out, log)
    elif (out / CONFIG).is_file():
        log(f"{out}: --no-resume: starting over; the checkpoint there is replaced at the first save")
    if run.step >= tcfg.steps:
        log(f"{out}: nothing left to train (step {run.step} of {tcfg.steps}); pass a larger --steps to train on")
        return _summary(run, out, None)
    loader, codec = _batches(run, source, workers, progress)
    return _loop(run, out, loader, codec, progress, log)


def _place(dev: torch.device, world: int) -> torch.device:
    """Under torchrun on GPUs each process takes the GPU of its local rank."""
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def _build(model_cfg: ModelConfig, tcfg: TrainConfig, dev: torch.device, rank: int, world: int) -> Run:
    """The models and optimizers; fine-tuning and distillation start from the EMA weights of
    `init_from` / `distill_from` / `dmd_from` (a resume overrides them)."""
    codec = None
    if model_cfg.latent:  # record which autoencoder the model learns the latents of: loads check it
        model_cfg = dataclasses.replace(model_cfg, autoencoder_sha256=model_cfg.autoencoder_sha256
                                        or autoencoder_sha256(model_cfg.autoencoder))
        codec = load_codec(model_cfg, dev)
    model = MirageUNet(model_cfg).to(dev)
    model.grad_checkpoint = tcfg.grad_checkpoint
    start_from = tcfg.init_from or tcfg.distill_from or tcfg.dmd_from
    sampling_steps = tcfg.student_steps or None
    start_model = None
    if start_from:
        start_model, start_meta = load_checkpoint(start_from, dev)
        check_same(start_model.cfg, model_cfg)
        model.load_state_dict(start_model.state_dict())
        sampling_steps = sampling_steps or start_meta.get("sampling_steps")
    if tcfg.distill_from:
        check_teacher(start_meta, tcfg.student_steps, tcfg.distill_from)
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    aux = {}
    if tcfg.dmd_from:
        fake = copy.deepcopy(start_model).train().requires_grad_(True)
        aux = {"fake": (fake, adamw(fake))}
    frozen = start_model.requires_grad_(False) if start_model is not None else None  # in eval mode, as loaded
    return Run(model_cfg, tcfg, dev, rank, world, model, copy.deepcopy(model).eval().requires_grad_(False),
               adamw(model), aux, teacher=frozen if tcfg.distill_from else None,
               real=frozen if tcfg.dmd_from else None, codec=codec, sampling_steps=sampling_steps)


def _resume(run: Run, out: Path, log: Callable[[str], None]) -> None:
    """Load the checkpoint in `out` into the run and say in one line what changed."""
    meta = read_meta(out)
    check_same(model_config(meta, out), run.cfg)
    if not (out / STATE).is_file():
        raise CheckpointError(f"{out}: holds weights but no {STATE}, so training cannot resume there; "
                              "choose another --out, or pass --no-resume to start over and replace it")
    meta = load_train_state(out, run.model, run.ema, run.opt, run.aux)
    run.step, run.elapsed, run.saved_loss = meta["step"], meta.get("train_seconds", 0.0), meta.get("loss", float("nan"))
    try:
        changes = config_changes(from_json(TrainConfig, meta["train"]), run.tcfg)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{out / CONFIG}: bad train config ({e})") from e
    run.resumes = meta.get("resumes", [])
    if run.step >= run.tcfg.steps:
        return
    said = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
    log(f"{out}: resuming at step {run.step} of {run.tcfg.steps}"
        + (f"; train config changed: {said} (recorded in {CONFIG})" if changes else ""))
    if changes:
        run.resumes = [*run.resumes, {"step": run.step, "changes": changes}]


def _batches(run: Run, source, workers: int, progress: bool):
    """(an endless iterator of (clips, cond) on the device, the codec a step still has to encode with)."""
    cfg, tcfg, dev = run.cfg, run.tcfg, run.dev
    stream = ClipStream(source, cfg.context_frames + 1, seed=tcfg.seed + 1000 * run.step, rank=run.rank)
    frames = batches(stream, tcfg.batch_size, workers, pin_memory=dev.type == "cuda")
    if not tcfg.latent_cache:
        return ((clips.to(dev, non_blocking=True), None) for clips in frames), run.codec
    # encode clips once, then train on their latents (mirage.train.latent_cache)
    cache = LatentCache.build(frames, run.codec, tcfg.latent_cache, bool(cfg.cond_channels), dev,
                              progress and run.rank == 0)
    del frames  # stops its worker processes
    return cache.batches(tcfg.batch_size, seed=tcfg.seed + 1000 * run.step + run.rank), None


def _loop(run: Run, out: Path, loader, codec, progress: bool, log: Callable[[str], None]) -> dict:
    """The optimizer steps from run.step to tcfg.steps, saving as due; stops early on a signal."""
    tcfg, dev, model = run.tcfg, run.dev, run.model
    step_fn: nn.Module = TrainStep(model, tcfg, run.teacher, codec)
    dmd = DMD(model, run.real, run.aux["fake"][0], tcfg, codec) if tcfg.dmd_from else None
    if run.world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[dev] if dev.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision)
    autocast = lambda: torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()  # one per use
    # DMD's fake score keeps a scale of its own
    scalers = [torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16") for _ in range(2)]
    start = last_save = time.monotonic()
    stopped = False
    model.train()
    with StopOnSignal(log) as stop, tqdm(total=tcfg.steps, initial=run.step, disable=not progress or run.rank != 0,
                                         desc="train", unit="step") as bar:
        while run.step < tcfg.steps and not stopped:
            for group in [*run.opt.param_groups, *(g for _, o in run.aux.values() for g in o.param_groups)]:
                group["lr"] = lr_at(run.step, tcfg)
            self_forced = is_self_forced_step(tcfg.seed, run.step, tcfg.self_forcing_prob)
            fake_loss = norm = 0.0
            if dmd is not None:
                loss, fake_loss = dmd_step(dmd, lambda: next(loader), run.opt, run.aux["fake"][1], scalers, autocast,
                                           self_forced, step_fn)
                run.fake_losses.append(fake_loss)
            else:
                clips, cond = next(loader)
                with autocast():
                    loss = step_fn(clips, self_forced, cond)
                norm = optimizer_step(run.opt, scalers[0], loss, model, tcfg.grad_clip)
                loss = loss.item()
            _check_finite(run, {"loss": loss, "the fake score's loss": fake_loss, "gradient norm": norm}, out)
            run.self_forced_steps += self_forced
            run.step += 1
            ema_update(run.ema, model, min(tcfg.ema_decay, (1 + run.step) / (10 + run.step)))
            run.losses.append(loss)
            bar.update(1)
            if run.step % tcfg.log_every == 0 or run.step == tcfg.steps:
                bar.set_postfix(loss=f"{_recent(run.losses, tcfg):.4f}",
                                **({"fake": f"{_recent(run.fake_losses, tcfg):.4f}"} if run.fake_losses else {}))
            stopped = _stop_everywhere(stop, run.world, dev)
            due = (run.step % tcfg.save_every == 0 or run.step == tcfg.steps or stopped
                   or time.monotonic() - last_save >= 60 * tcfg.save_minutes)
            if run.rank == 0 and due:
                _save(run, out, run.elapsed + time.monotonic() - start)
                last_save = time.monotonic()
    run.elapsed += time.monotonic() - start
    return _summary(run, out, stop.received if stopped else None)


def _check_finite(run: Run, values: dict[str, float], out: Path) -> None:
    """Stop at the first NaN / infinite loss or gradient, before the EMA or a save can take the
    weights it left (save_unit refuses non-finite tensors besides)."""
    bad = next((f"{name} {value}" for name, value in values.items() if not math.isfinite(value)), None)
    if bad is None:
        return
    raise TrainingDiverged(f"step {run.step + 1}: {bad} (lr {run.tcfg.lr:g}, precision {run.tcfg.precision}); "
                           f"training stopped and nothing of this step was saved ({out} keeps its last save); "
                           "lower --lr or use --precision fp32")


def _save(run: Run, out: Path, seconds: float) -> None:
    tcfg = run.tcfg
    save_checkpoint(out, run.model, run.ema, tcfg, run.step, run.opt, aux=run.aux, extra={
        "loss": _recent(run.losses, tcfg), "train_seconds": seconds,
        "parameters": parameter_count(run.model), "device": str(run.dev), "world_size": run.world,
        **({"sampling_steps": run.sampling_steps} if run.sampling_steps else {}),
        **({"fake_loss": _recent(run.fake_losses, tcfg)} if run.fake_losses else {}),
        **({"resumes": run.resumes} if run.resumes else {})})


def _summary(run: Run, out: Path, stopped_by: str | None) -> dict:
    """What train() returns: the saved loss when nothing was trained."""
    return {"step": run.step, "loss": _recent(run.losses, run.tcfg) if run.losses else run.saved_loss,
            "first_loss": run.losses[0] if run.losses else float("nan"), "seconds": run.elapsed,
            "parameters": parameter_count(run.model), "out": str(out), "self_forced_steps": run.self_forced_steps,
            "sampling_steps": run.sampling_steps, "stopped_by": stopped_by, "trained_steps": len(run.losses),
            **({"fake_loss": _recent(run.fake_losses, run.tcfg)} if run.fake_losses else {})}


def _recent(values: list[float], tcfg: TrainConfig) -> float:
    """The mean of the last log_every values."""
    recent = values[-tcfg.log_every:]
    return sum(recent) / len(recent)
