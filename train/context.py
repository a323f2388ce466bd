"""What a training step conditions frame K on: the video-to-video input, and the context memory:
which ring slots hold frames, how old they are, and history augmentation. Shared by the v-loss
step (trainer.TrainStep) and distribution matching (train/dmd.py), whose three models read one
context through their own encoders (`training_context` is the front of both).

For the K context frames (B, K, C, H, W) of clips whose frame K is the one to denoise:

    1. valid slots: the n most recent context frames, n ~ U{1..K} (n = 0 with probability
       empty_context_prob, so the model also learns the first frame of a video; n = K after a
       self-forced unroll, whose generated frames are the newest), placed in random ring slots
       with their ages (frame j is K - j old; age 0 marks an empty slot)
    2. history augmentation: a clip's context frames are noised to one t_ctx ~ U[0, context_noise_max]
       (with probability context_noise_prob, else t_ctx = 0), a level the context encoder sees
       as an input (Diffusion Forcing / MirageLSD style)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mirage.core.config import TrainConfig
from mirage.model.diffusion import q_sample
from mirage.model.unet import MirageUNet
from mirage.train.data import v2v_input
from mirage.train.latent_cache import encode_batch
from mirage.train.self_forcing import self_forced_context


@dataclass(frozen=True)
class Context:
    frames: torch.Tensor  # (B*K, C, H, W) noised context frames, in ring-slot order
    t_ctx: torch.Tensor  # (B*K,) their noise level
    ages: torch.Tensor  # (B, K) age of each slot's frame, 0 = empty

    def memory(self, model: MirageUNet) -> torch.Tensor:
        """The context as `model`'s encoder writes it into the ring buffer: (B, K, 2, N, D)."""
        return model.context_encode(self.frames, self.t_ctx).unflatten(0, tuple(self.ages.shape))


def sample_context(ctx: torch.Tensor, tcfg: TrainConfig, all_valid: bool = False) -> Context:
    """Context frames (B, K, C, H, W) -> a random training Context; `all_valid`: every slot holds
    a frame (after a self-forced unroll)."""
    b, k = ctx.shape[:2]
    dev = ctx.device
    # 1. valid slots
    n_valid = torch.randint(1, k + 1, (b,), device=dev)
    n_valid = torch.where(torch.rand(b, device=dev) < tcfg.empty_context_prob, 0, n_valid)
    if all_valid:
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
    flat = ctx.flatten(0, 1)  # (B*K, C, H, W)
    return Context(q_sample(flat, t_ctx, torch.randn_like(flat)), t_ctx, ages)


def training_context(model: MirageUNet, clips: torch.Tensor, cond: torch.Tensor | None, tcfg: TrainConfig,
                     self_forced: bool, codec=None) -> tuple[torch.Tensor, torch.Tensor | None, Context]:
    """For clips (B, K+1, C, H, W) (frames, or a latent model's latents from a LatentCache with
    their encoded input `cond`): (the clips as the model sees them, a latent model's codec encoding
    them; the video-to-video input of frame K; a random Context of frames 0..K-1, the last
    `self_forcing_horizon` of them the model's own when `self_forced`)."""
    cfg, k = model.cfg, clips.shape[1] - 1
    if codec is not None:  # a latent model learns on the frozen encoder's latents, conditioned on the encoded input
        clips, cond = encode_batch(codec, clips, bool(cfg.cond_channels))
    elif cond is None and cfg.cond_channels:  # pixels; or latents without a codec (the memory estimate): shapes
        cond = torch.zeros_like(clips[:, k]) if cfg.latent else v2v_input(clips[:, k])
    ctx = clips[:, :k]  # (B, K, C, H, W)
    if self_forced:
        ctx = self_forced_context(model, clips, tcfg.self_forcing_horizon, tcfg.self_forcing_steps,
                                  tcfg.self_forcing_context_noise, tcfg.self_forcing_strength)
    return clips, cond, sample_context(ctx, tcfg, all_valid=self_forced)
