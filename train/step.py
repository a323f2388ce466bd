"""One training step's loss (the v-loss, or progressive distillation's target) as a module, so
DistributedDataParallel sees one call per step. The steps are described in train/trainer.py;
the context in front of them is train/context.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirage.core.config import TrainConfig
from mirage.model.diffusion import T, q_sample, v_target
from mirage.model.unet import MirageUNet
from mirage.train.context import training_context
from mirage.train.distill import distill_target, step_table


class TrainStep(nn.Module):
    """The loss as a module forward, so DistributedDataParallel sees one call per step."""

    def __init__(self, model: MirageUNet, tcfg: TrainConfig, teacher: MirageUNet | None = None, codec=None):
        super().__init__()
        self.model, self.tcfg = model, tcfg
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, so DDP and the optimizer skip it
        self.codec = [codec] if codec is not None else []  # a latent model's frozen autoencoder (same reason)

    def forward(self, clips: torch.Tensor, self_forced: bool = False, cond: torch.Tensor | None = None) -> torch.Tensor:
        """`clips` (B, K+1, C, H, W): frames, or a latent model's latents (from a LatentCache, with
        their encoded input `cond` for video-to-video)."""
        tcfg, dev, b = self.tcfg, clips.device, clips.shape[0]
        clips, cond, context = training_context(self.model, clips, cond, tcfg, self_forced,  # steps 1 and 2
                                                self.codec[0] if self.codec else None)
        target = clips[:, -1]  # (B, C, H, W)
        memory, ages = context.memory(self.model), context.ages
        # 3. denoising loss on the target frame
        if self.teacher:  # the student's own timesteps
            index = torch.randint(0, tcfg.student_steps, (b,), device=dev)
            t = step_table(tcfg.student_steps).to(dev)[index, 0].long()
        else:
            t = torch.randint(0, T, (b,), device=dev)
        eps = torch.randn_like(target)
        x_t = q_sample(target, t, eps)
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad():
                t_memory = context.memory(teacher)
                goal = distill_target(lambda x, t_: teacher.denoise(x, t_, cond, t_memory, ages), x_t, index,
                                      tcfg.student_steps)
        else:
            goal = v_target(target, t, eps)
        v = self.model.denoise(x_t, t, cond, memory, ages)
        return F.mse_loss(v.float(), goal)
