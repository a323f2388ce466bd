"""Distribution matching distillation (DMD, DMD2: Yin et al. 2023, 2024) for the few-step
generator, with its own frames as context when self-forcing is on (Self-Forcing, Huang et al.
2025; CausVid, Yin et al. 2025). Notation as in mirage.model.diffusion.

Three models start from the same checkpoint (the teacher's EMA weights):

    G      the generator being trained: it samples a frame in its N DDIM steps (the runtime's)
    real   the frozen teacher: x̂_0^real(x_t) = α_t x_t - σ_t v_real(x_t, t) is the denoiser of the
           data distribution p_data
    fake   a trainable copy, trained with the ordinary v-loss on G's own samples: x̂_0^fake(x_t)
           is the denoiser of G's distribution p_G

All three read one context (the clip's first K frames, or its real prefix followed by G's own
frames: train/self_forcing.py; slots and history augmentation as in train/context.py) through
their own context encoder, and a video-to-video model's input frame; both distributions are
conditional on them.

One generator step:

    1. G's sample: from x_T ~ N(0, I), G runs its DDIM steps 0 .. e-1 without gradient and step e
       with it; x_0^G is that step's x̂_0 = α_t x_t - σ_t v. The exit step e is uniform over
       0 .. N-1 (dmd_exit "random"), as in Self-Forcing: with e = N-1 always ("last", the
       runtime's full sample, as DMD2's backward simulation) only G's last, least noisy timestep
       is trained, yet the first steps decide the frame and its sharpness. Either way memory
       stays that of one denoiser call with gradient.
    2. t ~ U[t_min, t_max] (DMD2: 2% .. 98% of T), ε ~ N(0, I), x_t = α_t sg(x_0^G) + σ_t ε
    3. x̂_0^real(x_t), x̂_0^fake(x_t), both without gradient
    4. the gradient of KL(p_G,t || p_data,t) with respect to the sample is the score difference
       s_fake - s_real = α_t / σ_t² (x̂_0^fake - x̂_0^real) (a score is (α_t x̂_0 - x_t) / σ_t²).
       DMD replaces the weight α_t / σ_t² by a per-sample normaliser, so every t counts alike:

           g = (x̂_0^fake - x̂_0^real) / mean|x_0^G - x̂_0^real|      (detached)

    5. L_G = ½ mean (x_0^G - sg(x_0^G - g))², whose gradient with respect to x_0^G is g / numel:
       a descent step moves G's sample toward the real denoiser's x̂_0 and away from the fake's.
       Where fake = real (p_G = p_data), g = 0.

One fake-score step (`dmd_fake_updates` of them per generator step, each on a fresh batch and a
fresh sample of G: DMD2's two-time-scale update keeps the fake score tracking p_G as G moves):

    t ~ U[0, T), ε ~ N(0, I), x_t = α_t sg(x_0^G) + σ_t ε, L_fake = |v_fake(x_t, t) - (α_t ε - σ_t sg(x_0^G))|²

Why not the v-loss: it regresses G's frame onto the real continuation, which a self-generated
context does not determine, and the average of what it cannot predict is a blur
(docs/QUALITY.md, "Self-forcing fine-tune"). DMD has no per-frame target: it matches G's
distribution, given whatever context, to the teacher's. The teacher's blur is the limit of what
it can fix: the real score is the teacher's, not the data's (`dmd_regression` adds the data's
v-loss back as an anchor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mirage.core.config import TrainConfig
from mirage.model.diffusion import T, Denoiser, ddim_sample, ddim_timesteps, predict_x0, q_sample, v_target
from mirage.model.unet import MirageUNet
from mirage.train.context import Context, training_context

T_MIN, T_MAX = 20, 980  # the generator loss's t range (DMD2's 2% .. 98%): the ends carry little signal


def generator_sample(denoise: Denoiser, x_T: torch.Tensor, steps: int, exit_step: int,
                     cond: torch.Tensor | None = None) -> torch.Tensor:
    """x̂_0 of DDIM step `exit_step` of `steps` from noise x_T, with gradient through that step only."""
    with torch.no_grad():
        x = ddim_sample(denoise, x_T, steps, cond, stop_step=exit_step)
    t = torch.full((x.shape[0],), ddim_timesteps(steps)[exit_step], device=x.device, dtype=torch.long)
    return predict_x0(x, t, denoise(x, t, cond))


@torch.no_grad()
def dmd_gradient(x0_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x̂_0^fake - x̂_0^real) / mean|x_0^G - x̂_0^real|, normalised per sample (step 4)."""
    scale = (x0_g - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x0_fake - x0_real) / scale.clamp_min(1e-6)  # a sample already on the real x̂_0 gets no push


def generator_loss(x0_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """L_G = ½ mean (x_0^G - sg(x_0^G - g))² (step 5): its gradient with respect to x_0^G is g / numel."""
    x = x0_g.float()
    g = dmd_gradient(x.detach(), x0_real.float(), x0_fake.float())
    return 0.5 * F.mse_loss(x, (x - g).detach())


@dataclass(frozen=True)
class Sample:
    """G's sample of frame K of a batch of clips, and what it was conditioned on."""
    x0: torch.Tensor  # (B, C, H, W) x_0^G; carries G's gradient if sampled with grad
    context: Context
    cond: torch.Tensor | None  # video-to-video: the input frame (B, C, H, W)


class DMD:
    """The generator G (`model`, trained by the caller's optimizer), the frozen real score and
    the trainable fake score; the caller steps the optimizers (trainer.dmd_step)."""

    def __init__(self, model: MirageUNet, real: MirageUNet, fake: MirageUNet, tcfg: TrainConfig, codec=None):
        self.model, self.real, self.fake, self.tcfg, self.codec = model, real, fake, tcfg, codec

    def sample(self, clips: torch.Tensor, cond: torch.Tensor | None, self_forced: bool, grad: bool) -> Sample:
        """Step 1 for clips (B, K+1, C, H, W) (frames, or a latent model's latents with their `cond`)."""
        tcfg = self.tcfg
        # a latent model samples latents, conditioned on the encoded input
        clips, cond, context = training_context(self.model, clips, cond, tcfg, self_forced, self.codec)
        steps = tcfg.self_forcing_steps
        exit_step = steps - 1 if tcfg.dmd_exit == "last" else int(torch.randint(0, steps, ()))
        with torch.set_grad_enabled(grad):
            memory = context.memory(self.model)  # with gradient: G's context encoder learns too
            x0 = generator_sample(lambda x, t, c: self.model.denoise(x, t, c, memory, context.ages),
                                  torch.randn_like(clips[:, -1]), steps, exit_step, cond)
        return Sample(x0, context, cond)

    def _x0(self, score: MirageUNet, x_t: torch.Tensor, t: torch.Tensor, sample: Sample) -> torch.Tensor:
        v = score.denoise(x_t, t, sample.cond, sample.context.memory(score), sample.context.ages)
        return predict_x0(x_t, t, v)

    def generator_loss(self, sample: Sample) -> torch.Tensor:
        """Steps 2-5: L_G for a sample drawn with grad."""
        x0 = sample.x0
        t = torch.randint(T_MIN, T_MAX + 1, (x0.shape[0],), device=x0.device)
        x_t = q_sample(x0.detach(), t, torch.randn_like(x0))
        with torch.no_grad():
            x0_real, x0_fake = self._x0(self.real, x_t, t, sample), self._x0(self.fake, x_t, t, sample)
        return generator_loss(x0, x0_real, x0_fake)

    def fake_loss(self, sample: Sample) -> torch.Tensor:
        """The fake score's v-loss on G's (detached) sample, at the sample's context."""
        x0 = sample.x0.detach()
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, t, eps)
        v = self.fake.denoise(x_t, t, sample.cond, sample.context.memory(self.fake), sample.context.ages)
        return F.mse_loss(v.float(), v_target(x0, t, eps))
