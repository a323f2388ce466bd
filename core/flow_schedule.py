"""The flow-matching schedule of the chunk-causal video DiT, in plain Python (the runtime has no torch).

Flow matching (Wan 2.1, Self-Forcing): x_t = (1 - σ) x_0 + σ ε with σ in [0, 1], the model predicts the
velocity v = ε - x_0 at timestep t = 1000 σ, so x_0 = x_t - σ v. Self-Forcing's sampler
(guandeh17/Self-Forcing, utils/scheduler.py FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)
with set_timesteps(1000); pipeline/causal_inference.py) samples a block of latent frames in S steps:

    x = ε_0;  for i in 0..S-1:  x_0 = x - σ_i v(x, t_i);  x = (1 - σ_{i+1}) x_0 + σ_{i+1} ε_{i+1}  (not after the last)

with fresh noise ε_{i+1} at each re-noising, then runs the model once more on the clean x_0 labelled with
the context timestep (config `context_noise`, 0 by default; its code passes x_0 itself, not noised) to
write the block's keys and values into the cache.

Its published step list (configs/self_forcing_dmd.yaml) is [1000, 750, 500, 250] with
`warp_denoising_step: true` and `timestep_shift: 5.0`: each entry s picks the (1000 - s)-th of the
1000 shifted training timesteps, giving t = [1000, 937.5, 833.3, 625]. Self-Forcing computes these tables
in float32 (torch.linspace); here they are float64, equal to its values within float32 rounding.
"""
from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: float, shift: float) -> float:
    """Wan's timestep shift: σ' = s σ / (1 + (s - 1) σ); s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def train_sigmas(shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """The scheduler's σ table: linspace(1, 0, num_train + 1) without its last entry, shifted
    (FlowMatchScheduler with sigma_min=0, extra_one_step=True, set_timesteps(num_train))."""
    return [shift_sigma(1.0 - i / num_train, shift) for i in range(num_train)]


def train_timesteps(shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """t = num_train · σ for each entry of `train_sigmas`."""
    return [num_train * s for s in train_sigmas(shift, num_train)]


def warp_timesteps(step_list: tuple[int, ...], shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """Self-Forcing's `warp_denoising_step`: entry s becomes the shifted timestep at index num_train - s
    of [train_timesteps..., 0] (so s = num_train is pure noise, t = num_train)."""
    table = train_timesteps(shift, num_train) + [0.0]
    for s in step_list:
        if not 0 <= s <= num_train:
            raise ValueError(f"denoising step {s} outside [0, {num_train}]")
    return [table[num_train - s] for s in step_list]


def sigma_at(t: float, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> float:
    """σ the scheduler uses for timestep t: that of the nearest table timestep (its argmin lookup in
    add_noise and the flow-to-x_0 conversion); t = 0 (the clean context) is σ = 0."""
    if t <= 0:
        return 0.0
    sigmas = train_sigmas(shift, num_train)
    nearest = min(range(num_train), key=lambda i: abs(num_train * sigmas[i] - t))
    return sigmas[nearest]


def block_schedule(step_list: tuple[int, ...], shift: float, warp: bool) -> list[tuple[float, float, float]]:
    """Rows (t_i, σ_i, σ_next) of one block's denoising steps; σ_next is the level the prediction is
    re-noised to before step i + 1, and 0 after the last step (the block's clean output)."""
    ts = warp_timesteps(step_list, shift) if warp else [float(s) for s in step_list]
    sigmas = [sigma_at(t, shift) for t in ts]
    return [(t, s, sigmas[i + 1] if i + 1 < len(ts) else 0.0) for i, (t, s) in enumerate(zip(ts, sigmas))]


def flow_x0(x, v, sigma: float):
    """x_0 = x_t - σ v: the clean block a velocity prediction implies (floats, numpy arrays or torch
    tensors alike, as core/schedule.ddim_step)."""
    return x - sigma * v


def flow_renoise(x0, noise, sigma: float):
    """x_t = (1 - σ) x_0 + σ ε: a prediction put back at noise level σ for the next step."""
    return (1 - sigma) * x0 + sigma * noise


def strength_schedule(schedule: list[tuple[float, float, float]], strength: float) -> list[tuple[float, float, float]]:
    """Video-to-video (SDEdit, StreamDiffusionV2): the rows of `schedule` that remain after an input is put
    at noise level σ = strength. The first row denoises from σ = strength itself (t = 1000 σ, the flow
    matching timestep of that level), the rest are the schedule's rows below it. Strength 1 is the full
    schedule from pure noise; strength 0 is no row (the input is taken as the clean block)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength {strength} outside [0, 1]")
    if strength == 0:
        return []
    below = [row for row in schedule if row[1] < strength]
    return [(NUM_TRAIN_TIMESTEPS * strength, strength, below[0][1] if below else 0.0), *below]
