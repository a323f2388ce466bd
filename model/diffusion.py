"""Noise schedule and DDIM sampling as pure functions.

Notation (DDPM/DDIM papers, v-prediction of Salimans & Ho 2022):

    t          integer timestep in [0, T), T = 1000; larger is noisier
    ᾱ_t        alphas_cumprod[t]            (abar)
    α_t, σ_t   sqrt(ᾱ_t), sqrt(1 - ᾱ_t)     (alpha, sigma)
    x_t        α_t x_0 + σ_t ε
    v          α_t ε - σ_t x_0              (what the network predicts)
    x̂_0, ε̂    α_t x_t - σ_t v,  σ_t x_t + α_t v

The schedule is cosine, rescaled to zero terminal SNR (Lin et al. 2024: ᾱ_{T-1} = 0), so
sampling starts from pure noise exactly as in training; v-prediction stays well posed there
where ε-prediction would not be. DDIM timesteps use "trailing" spacing for the same reason.

A denoiser is any callable ``denoise(x_t, t, cond) -> v`` (memory already bound), so the
PyTorch model, ONNX Runtime and TensorRT all plug into ``ddim_sample``.
"""
from __future__ import annotations

from typing import Callable

import torch

from mirage.core import schedule

T = schedule.T
ALPHAS_CUMPROD = torch.tensor(schedule.ALPHAS_CUMPROD, dtype=torch.float64)
ddim_timesteps = schedule.ddim_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def alpha_sigma(t: torch.Tensor, abar: torch.Tensor = ALPHAS_CUMPROD) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t, σ_t for integer timesteps t (any shape), in float32 on t's device."""
    a = abar.to(t.device)[t.long()]
    return a.sqrt().float(), (1 - a).sqrt().float()


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x_0 + σ_t ε for a batch, t of shape (B,)."""
    a, s = alpha_sigma(t)
    return a[:, None, None, None] * x0 + s[:, None, None, None] * eps


def v_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(t)
    return a[:, None, None, None] * eps - s[:, None, None, None] * x0


def ddim_coefficients(steps: int, eta: float = 0.0) -> torch.Tensor:
    """Per-step coefficients, a (steps, 6) float64 table: see mirage.core.schedule.ddim_coefficients."""
    return torch.tensor(schedule.ddim_coefficients(steps, eta), dtype=torch.float64)


def ddim_update(x_t: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_prev from the v-prediction, coef = one row of ddim_coefficients."""
    _, a_t, s_t, a_prev, c_eps, c_rand = coef.tolist()
    x_prev = schedule.ddim_step(x_t, v, a_t, s_t, a_prev, c_eps)
    if c_rand > 0:
        if noise is None:
            raise ValueError("eta > 0 needs fresh noise for every step")
        x_prev = x_prev + c_rand * noise  # 4. DDPM-like stochasticity when eta > 0
    return x_prev


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x̂_0 for a batch, t of shape (B,)."""
    a, s = alpha_sigma(t)
    return schedule.predict_x0(x_t, v.float(), a[:, None, None, None], s[:, None, None, None])


def ddim_sample(denoise: Denoiser, x_T: torch.Tensor, steps: int, cond: torch.Tensor | None = None,
                eta: float = 0.0, generator: torch.Generator | None = None, first_step: int = 0,
                stop_step: int | None = None) -> torch.Tensor:
    """Run `steps` DDIM steps from x_T (pure noise) and return x̂_0 (not clamped). With
    first_step = i > 0, x_T is a sample at the i-th timestep instead (x_t of a partly noised
    frame, SDEdit) and only steps i .. steps-1 run; with stop_step = j, only steps before j run
    and the result is x_t at the j-th timestep."""
    coefs = ddim_coefficients(steps, eta)
    x = x_T
    for row in coefs[first_step:stop_step]:
        t = torch.full((x.shape[0],), int(row[0]), device=x.device, dtype=torch.long)
        v = denoise(x, t, cond).float()
        noise = torch.randn(x.shape, generator=generator).to(x.device) if row[5] > 0 else None
        x = ddim_update(x, v, row, noise)
    return x
