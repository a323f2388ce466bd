"""The noise schedule and DDIM coefficient table in plain Python (the runtime has no torch).

mirage.model.diffusion builds its tensors from these functions, so training, the reference
sampler and every runtime backend share one definition. Notation as in model/diffusion.py.
"""
from __future__ import annotations

import math

T = 1000  # training timesteps


def cosine_alphas_cumprod(num_steps: int = T, s: float = 0.008) -> list[float]:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal), rescaled so that ᾱ_{T-1} = 0 exactly
    (zero terminal SNR, Lin et al. 2024) while ᾱ_0 is unchanged."""
    f = [math.cos(((i / num_steps) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(num_steps + 1)]
    a = [math.sqrt(max(0.0, f[i + 1] / f[0])) for i in range(num_steps)]
    a0, a_last = a[0], a[-1]
    return [((x - a_last) * a0 / (a0 - a_last)) ** 2 for x in a]


ALPHAS_CUMPROD = cosine_alphas_cumprod()


def ddim_timesteps(steps: int, num_train: int = T) -> list[int]:
    """Trailing spacing: `steps` timesteps from T-1 (pure noise) down."""
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps={steps}: choose between 1 and {num_train}")
    return [round(num_train - 1 - i * num_train / steps) for i in range(steps)]


def ddim_coefficients(steps: int, eta: float = 0.0) -> list[list[float]]:
    """Rows [t, α_t, σ_t, α_prev, sqrt(1 - ᾱ_prev - s²), s] per step, s = DDIM stochasticity
    (eta = 0: deterministic). The last step's "prev" is the clean sample (ᾱ_prev = 1)."""
    ts = ddim_timesteps(steps)
    rows = []
    for i, t in enumerate(ts):
        abar_t = ALPHAS_CUMPROD[t]
        abar_prev = ALPHAS_CUMPROD[ts[i + 1]] if i + 1 < len(ts) else 1.0
        s = eta * math.sqrt(max(0.0, (1 - abar_prev) / max(1 - abar_t, 1e-12) * (1 - abar_t / abar_prev)))
        rows.append([float(t), math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(abar_prev),
                     math.sqrt(max(0.0, 1 - abar_prev - s * s)), s])
    return rows


DEFAULT_STEPS = 4  # DDIM steps per frame of a model that records none (docs/QUALITY.md: quality vs. steps)


def default_steps(meta: dict) -> int:
    """The step count a model samples with by default: the `sampling_steps` its checkpoint
    config.json (or artifact manifest) records — a distilled student records its own — else 4."""
    return int(meta.get("sampling_steps") or DEFAULT_STEPS)
