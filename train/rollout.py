"""The reference rollout: the runtime's frame loop (mirage.core.loop.run_frame) on the PyTorch
model, eagerly, on the model's device and dtype. Per frame n (see core/loop.py):

    x_T ~ N(0, I) -> DDIM with denoise(·, t_i, cond_n, memory, ages) -> clamp -> emit
    -> noise to t_ctx (history augmentation) -> context_encode -> ring-buffer slot n mod K

The noise comes from the loop's counter-based generator, so a seed gives the same video here,
in the runtime on every backend, and in the parity checks of mirage-export.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from mirage.core import graphs as G
from mirage.core.loop import Schedule, make_buffers, run_frame
from mirage.core.schedule import CONTEXT_NOISE, DEFAULT_STEPS
from mirage.model.torch_backend import TorchBackend
from mirage.model.torch_ops import TorchOps
from mirage.model.unet import MirageUNet



@torch.no_grad()
def rollout(model: MirageUNet, num_frames: int, *, steps: int = DEFAULT_STEPS, seed: int = 0,
            cond: Iterable[torch.Tensor] | None = None, context_noise: int = CONTEXT_NOISE,
            batch: int = 1, callback: Callable[[dict], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield num_frames frames (B, C, H, W) in [-1, 1]; row b is seeded with seed + b. `cond`
    yields input frames (video-to-video models); `callback` sees every graph call."""
    cfg = model.cfg
    if bool(cfg.cond_channels) != (cond is not None):
        raise ValueError("video-to-video models need an input stream (cond); generation models take none"
                         if cfg.cond_channels else "this generation model takes no input stream")
    param = next(model.parameters())
    device, dtype = param.device, str(param.dtype).split(".")[1]
    codec = None
    if cfg.latent:
        from mirage.train.codec import load_codec

        codec = load_codec(cfg)
    backend = TorchBackend(model, str(device), dtype, codec=codec)
    ops, sched = TorchOps(device), Schedule.ddim(steps, context_noise)
    specs = G.model_graphs(cfg, batch, precision="fp16" if dtype == "float16" else "fp32")
    buf = make_buffers(specs, sched, lambda shape, dt: torch.zeros(shape, dtype=getattr(torch, dt), device=device),
                       ops.fill_, backend.buffer_dtype)
    for b in range(batch):
        ops.reset_row_(buf, b, seed + b)
    shape = tuple(buf.input.shape) if buf.input is not None else None
    cond_iter = iter(cond) if cond is not None else None
    for n in range(num_frames):
        if cond_iter is not None:
            c = next(cond_iter, None)
            if c is None:
                return
            if tuple(c.shape) != shape:
                raise ValueError(f"input frame {n} has shape {tuple(c.shape)}, the model takes {shape}")
            buf.input.copy_(c)
        run_frame(backend, ops, buf, sched, callback)
        yield buf.frame.clone()
