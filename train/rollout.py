"""Autoregressive rollout: frame after frame, each conditioned on the context ring buffer.

Per frame n (generation; video-to-video adds the input frame as `cond`):

    1. x_T ~ N(0, I)
    2. x̂_0 = DDIM(denoise(·, ·, cond_n, memory, ages), x_T, steps)
    3. the frame is clamped to [-1, 1] and emitted
    4. history augmentation at inference: the frame is noised to level t_ctx (the model was
       trained on context noised to random levels, so it does not trust its own history
       blindly; this is what keeps 500-frame rollouts from drifting)
    5. kv = context_encode(noised frame, t_ctx) is written into slot n mod K
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from mirage.core import schedule
from mirage.model.diffusion import ddim_sample, q_sample
from mirage.train.memory import empty_memory, ring_write
from mirage.model.unet import MirageUNet

DEFAULT_STEPS = schedule.DEFAULT_STEPS  # DDIM steps per frame
DEFAULT_CONTEXT_NOISE = 100  # t_ctx used at inference, inside the training range [0, context_noise_max]


def _noise(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same video on every device.
    return torch.randn(shape, generator=gen).to(device)


@torch.no_grad()
def rollout(model: MirageUNet, num_frames: int, *, steps: int = DEFAULT_STEPS, seed: int = 0,
            cond: Iterable[torch.Tensor] | None = None, context_noise: int = DEFAULT_CONTEXT_NOISE,
            batch: int = 1, eta: float = 0.0) -> Iterator[torch.Tensor]:
    """Yield num_frames frames (B, C, H, W) in [-1, 1]. `cond` yields input frames (v2v models)."""
    cfg = model.cfg
    if bool(cfg.cond_channels) != (cond is not None):
        raise ValueError("video-to-video models need an input stream (cond); generation models take none"
                         if cfg.cond_channels else "this generation model takes no input stream")
    # Any object with cfg, denoise and context_encode rolls out (ONNX Runtime, TensorRT...);
    # those that are not torch modules take and return CPU tensors.
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    memory, ages = empty_memory(cfg, batch, device)
    shape = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    cond_iter = iter(cond) if cond is not None else None
    t_ctx = torch.full((batch,), context_noise, device=device, dtype=torch.long)
    for n in range(num_frames):
        c = None
        if cond_iter is not None:
            c = next(cond_iter, None)
            if c is None:
                return
            c = c.to(device)
            if tuple(c.shape) != shape:
                raise ValueError(f"input frame {n} has shape {tuple(c.shape)}, the model takes {shape}")

        def denoise(x, t, c_, memory=memory, ages=ages):
            return model.denoise(x, t, c_, memory, ages)

        frame = ddim_sample(denoise, _noise(shape, gen, device), steps, c, eta=eta, generator=gen).clamp(-1, 1)
        yield frame
        ctx = q_sample(frame, t_ctx, _noise(shape, gen, device)) if context_noise > 0 else frame
        ring_write(memory, ages, model.context_encode(ctx, t_ctx), n)
